"""Checks of the Helm chart in helm/vlm-mesh, with real tools only:

- Helm's own Go library (helm-python-sdk) lints the chart, validates values against
  values.schema.json and renders the templates, exactly as `helm template` would;
- every rendered manifest is validated against the Kubernetes API's JSON schemas
  (kubernetes-validate, strict: unknown fields are errors) for the oldest Kubernetes the chart
  supports (Chart.yaml kubeVersion) and the newest the validator knows; cert-manager objects
  against models generated from cert-manager's CRDs (cloudcoil.models.cert_manager), the
  ServiceMonitor against models generated from the Prometheus Operator's
  (cloudcoil.models.prometheus_operator), KEDA's ScaledObjects against models generated from
  KEDA's CRDs (cloudcoil.models.keda, KEDA 2.16), Gateway API routes against the strict schema in
  gateway_api.py (no models of those CRDs are published);
- then the properties the issue asks for are asserted on the rendered objects.

Run with scripts/test-helm.sh (installs the tools into a venv outside the repository).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import tempfile
import unittest
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from cloudcoil.models.cert_manager import v1 as cert_manager_v1
from cloudcoil.models.keda import v1alpha1 as keda_v1alpha1
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator_v1

import gateway_api

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "vlm-mesh"
PRODUCTION = CHART / "ci" / "production-values.yaml"
COMPONENTS = ["gateway", "encoder", "projector", "decoder"]
INTERNAL = ["encoder", "projector", "decoder"]
RELEASE = "vlm"
NAMESPACE = "ml"


def chart_meta() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def kube_versions() -> list[str]:
    """The chart's minimum Kubernetes (from kubeVersion) and the newest schemas available."""
    floor = re.search(r"(\d+\.\d+)", chart_meta()["kubeVersion"]).group(1)
    return sorted({floor, kubernetes_validate.utils.latest_version()})


def production_values() -> dict:
    return yaml.safe_load(PRODUCTION.read_text())


def render(values: dict | None = None, chart: Path = CHART) -> list[dict]:
    """`helm template` through Helm's library: every object, NOTES.txt left out."""
    with helm.Chart.load(chart) as c:
        out = c.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def notes(values: dict | None = None) -> str:
    with helm.Chart.load(CHART) as c:
        out = c.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


CRD_MODELS = {
    "cert-manager.io/": cert_manager_v1,
    "monitoring.coreos.com/": prometheus_operator_v1,
    "keda.sh/": keda_v1alpha1,
}


def validate_manifest(doc: dict, version: str) -> None:
    """Raises if `doc` is not a valid object of its kind."""
    crd = next((m for group, m in CRD_MODELS.items() if doc["apiVersion"].startswith(group)), None)
    if doc["apiVersion"].startswith("gateway.networking.k8s.io/"):
        # No CRD models on PyPI for the Gateway API: a strict schema written out by hand.
        gateway_api.validate(doc)
    elif crd is not None:
        model = getattr(crd, doc["kind"])
        parsed = model.model_validate(doc)
        # The models ignore fields the CRD does not have; a lossless round trip proves there were none.
        back = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
        if back != doc:
            raise ValueError(
                f"{doc['kind']}/{doc['metadata']['name']}: fields unknown to its CRD: "
                f"{json.dumps(doc, sort_keys=True)} != {json.dumps(back, sort_keys=True)}"
            )
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def name_of(component: str) -> str:
    return f"{RELEASE}-vlm-mesh-{component}"


def component_of(doc: dict) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]


def mesh_container(deployment: dict) -> dict:
    (c,) = [
        c
        for c in deployment["spec"]["template"]["spec"]["containers"]
        if c["args"][:1] == ["serve"]
    ]
    return c


def arg(container: dict, flag: str) -> str:
    args = container["args"]
    return args[args.index(flag) + 1]


def env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def named_port(ports: list[dict], name: str) -> dict | None:
    return next((p for p in ports if p["name"] == name), None)


def gib(quantity: str) -> float:
    """A Kubernetes memory quantity (binary or decimal suffix) in GiB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", quantity)
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(m.group(1)) * scale[m.group(2)] / 2**30


def selects(selector: dict, labels: dict) -> bool:
    """Whether a LabelSelector (matchLabels and In/NotIn/Exists expressions) matches `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op = e["key"], e["operator"]
        if op == "In" and labels.get(key) not in e["values"]:
            return False
        if op == "NotIn" and labels.get(key) in e["values"]:
            return False
        if op == "Exists" and key not in labels:
            return False
    return True


VARIANTS = {
    "default": None,
    "production": "production",
}


class RenderAndValidate(unittest.TestCase):
    """Both values files render, lint clean, and every object validates."""

    def check_values(self, values: dict | None) -> list[dict]:
        lint = helm.lint(CHART, values, strict=True, kube_version="v" + kube_versions()[0] + ".0")
        self.assertEqual(lint["errors"], [], lint)
        # Helm's lint reports "icon is recommended" as info; anything at warning or above fails.
        self.assertEqual([m for m in lint["messages"] if m["severity"] >= 2], [], lint)
        docs = render(values)
        self.assertGreater(len(docs), 10)
        for version in kube_versions():
            for doc in docs:
                with self.subTest(version=version, kind=doc["kind"], name=doc["metadata"]["name"]):
                    validate_manifest(doc, version)
        return docs

    def test_default_values(self):
        docs = self.check_values(None)
        kinds = {d["kind"] for d in docs}
        self.assertLessEqual(
            {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceAccount"},
            kinds,
        )

    def test_production_values(self):
        docs = self.check_values(production_values())
        self.assertIn("Certificate", {d["kind"] for d in docs})

    def test_every_optional_part_on(self):
        """Jaeger, the chart's own CA, extra HPA metrics, init containers: still valid."""
        values = {
            "jaeger": {"enabled": True},
            "certManager": {"enabled": True},
            "model": {
                "volume": {"emptyDir": {"sizeLimit": "20Gi"}},
                "initContainers": [
                    {
                        "name": "fetch-model",
                        "image": "busybox:1.36",
                        "command": ["sh", "-c", "cp -r /src/. /models/"],
                        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
                        "volumeMounts": [{"name": "model", "mountPath": "/models"}],
                    }
                ],
            },
            "encoder": {
                "quantize": "q8_0",
                "autoscaling": {
                    "metrics": [
                        {
                            "type": "Pods",
                            "pods": {
                                "metric": {"name": "vlm_encoder_calls_in_flight"},
                                "target": {"type": "AverageValue", "averageValue": "4"},
                            },
                        }
                    ]
                },
            },
            "decoder": {"quantize": "q4_k"},
            "gateway": {
                "plaintext": True,
                "service": {"type": "LoadBalancer"},
                "openai": {"enabled": True, "allowImageUrls": True, "allowPrivateImageUrls": True},
            },
            "metrics": {
                "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}, "scrapeTimeout": "10s"},
                "networkPolicy": {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
            },
            "listenHost": "::",
        }
        docs = self.check_values(values)
        self.assertIn(name_of("jaeger"), objects(docs, "Deployment"))
        self.assertIn(f"{RELEASE}-vlm-mesh-ca", objects(docs, "Issuer"))
        self.assertIn(f"{RELEASE}-vlm-mesh", objects(docs, "ServiceMonitor"))

    def test_validator_catches_a_schema_violation(self):
        """The check is not vacuous: a manifest the API would reject fails validation."""
        docs = render(None)
        deployment = copy.deepcopy(objects(docs, "Deployment")[name_of("encoder")])
        mesh_container(deployment)["readinessProbe"]["grpc"]["port"] = "health"  # must be an int
        with self.assertRaises(kubernetes_validate.ValidationError):
            validate_manifest(deployment, kube_versions()[-1])
        service = copy.deepcopy(objects(docs, "Service")[name_of("encoder")])
        service["spec"]["clusterIp"] = "None"  # misspelt field: strict mode rejects it
        with self.assertRaises(kubernetes_validate.ValidationError):
            validate_manifest(service, kube_versions()[-1])
        cert = copy.deepcopy(objects(render({"certManager": {"enabled": True}}), "Certificate")[name_of("encoder")])
        cert["spec"]["dnsNmes"] = cert["spec"].pop("dnsNames")
        with self.assertRaises(ValueError):
            validate_manifest(cert, kube_versions()[-1])
        monitor = render({"metrics": {"serviceMonitor": {"enabled": True}}})
        monitor = copy.deepcopy(next(iter(objects(monitor, "ServiceMonitor").values())))
        validate_manifest(monitor, kube_versions()[-1])
        monitor["spec"]["endpoints"][0]["prot"] = monitor["spec"]["endpoints"][0].pop("port")
        with self.assertRaises(ValueError):
            validate_manifest(monitor, kube_versions()[-1])

    def test_broken_template_fails_rendering(self):
        with tempfile.TemporaryDirectory() as tmp:
            broken = Path(tmp) / "vlm-mesh"
            shutil.copytree(CHART, broken)
            path = broken / "templates" / "service.yaml"
            path.write_text(path.read_text().replace("{{- end }}", "", 1))
            with self.assertRaises(helm.HelmError):
                render(None, chart=broken)

    def test_min_above_max_is_refused(self):
        with self.assertRaisesRegex(helm.HelmError, "minReplicas"):
            render({"decoder": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}})


class ValuesSchema(unittest.TestCase):
    """values.schema.json accepts both values files and rejects wrong types and typos."""

    def setUp(self):
        self.schema = json.loads((CHART / "values.schema.json").read_text())
        jsonschema.Draft7Validator.check_schema(self.schema)
        self.defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def merged(self, overrides: dict) -> dict:
        with helm.Chart.load(CHART) as c:
            return c.merge_values(overrides)

    def errors(self, values: dict) -> list[str]:
        return [e.message for e in jsonschema.Draft7Validator(self.schema).iter_errors(values)]

    def test_accepts_the_shipped_values(self):
        self.assertEqual(self.errors(self.defaults), [])
        self.assertEqual(self.errors(self.merged(production_values())), [])
        with helm.Chart.load(CHART) as c:
            c.validate_schema(production_values())

    def test_rejects_wrong_types(self):
        bad = [
            {"encoder": {"replicas": "four"}},
            {"decoder": {"autoscaling": {"maxReplicas": "8"}}},
            {"cache": {"enabled": "yes"}},
            {"ports": {"health": 70000}},
            {"model": {"dtype": "int8"}},
            # The binary refuses bf16 compute on CPU at load: the schema does not offer it.
            {"model": {"dtype": "bf16"}},
            {"decoder": {"quantize": "q4"}},
            {"gateway": {"quantize": "q8_0"}},  # the gateway loads no weights
            {"ports": {"metrics": 0}},
            {"metrics": {"enabled": "yes"}},
            {"metrics": {"serviceMonitor": {"interval": "30"}}},
            {"gateway": {"openai": {"port": "8080"}}},
            {"gateway": {"openai": {"enable": True}}},
            {"gateway": {"service": {"type": "Ingress"}}},
            {"tls": {"allowedCallers": ""}},
            {"tls": {"allowedCallers": "Gateway"}},
            {"tls": {"allowedCallers": "gateway,"}},
        ]
        for overrides in bad:
            with self.subTest(overrides=overrides):
                self.assertNotEqual(self.errors(self.merged(overrides)), [])
                # Helm itself refuses it (what `helm install` does) …
                with helm.Chart.load(CHART) as c:
                    with self.assertRaises(helm.HelmValuesError):
                        c.validate_schema(overrides)
                # … and so rendering fails.
                with self.assertRaises(helm.HelmValuesError):
                    render(overrides)

    def test_rejects_unknown_keys(self):
        with self.assertRaisesRegex(helm.HelmValuesError, "replicaz"):
            render({"encoder": {"replicaz": 3}})


class Scaling(unittest.TestCase):
    """Encoder and decoder are separate Deployments with separate HPAs and replica counts."""

    def test_production_hpas_follow_the_values_file(self):
        values = production_values()
        docs = render(values)
        deployments = objects(docs, "Deployment")
        hpas = objects(docs, "HorizontalPodAutoscaler")
        for component in COMPONENTS:
            with self.subTest(component=component):
                name = name_of(component)
                self.assertIn(name, deployments)
                hpa = hpas[name]
                self.assertEqual(
                    hpa["spec"]["scaleTargetRef"],
                    {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                )
                want = values[component]["autoscaling"]
                self.assertEqual(hpa["spec"]["minReplicas"], want["minReplicas"])
                self.assertEqual(hpa["spec"]["maxReplicas"], want["maxReplicas"])
                # The HPA owns the count: an upgrade must not reset it.
                self.assertNotIn("replicas", deployments[name]["spec"])
                cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
                self.assertEqual(cpu[0]["resource"]["name"], "cpu")
        enc, dec = hpas[name_of("encoder")]["spec"], hpas[name_of("decoder")]["spec"]
        self.assertNotEqual(
            (enc["minReplicas"], enc["maxReplicas"]), (dec["minReplicas"], dec["maxReplicas"])
        )
        # The production shape the chart ships, as rendered (not as values.yaml says it):
        # 2 gateways, 4 encoders, 2 decoders at minimum.
        self.assertEqual(hpas[name_of("gateway")]["spec"]["minReplicas"], 2)
        self.assertEqual(hpas[name_of("encoder")]["spec"]["minReplicas"], 4)
        self.assertEqual(hpas[name_of("decoder")]["spec"]["minReplicas"], 2)
        # Each Deployment selects only its own pods.
        selectors = {
            n: tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for n, d in deployments.items()
        }
        self.assertEqual(len(set(selectors.values())), len(selectors))
        self.assertEqual(
            hpas[name_of("encoder")]["spec"]["behavior"], values["encoder"]["autoscaling"]["behavior"]
        )

    def test_fixed_replicas_without_hpa(self):
        values = {
            "encoder": {"replicas": 3, "autoscaling": {"enabled": False}},
            "decoder": {"replicas": 5, "autoscaling": {"enabled": False}},
        }
        docs = render(values)
        deployments = objects(docs, "Deployment")
        hpas = objects(docs, "HorizontalPodAutoscaler")
        for component in ("encoder", "decoder"):
            self.assertEqual(deployments[name_of(component)]["spec"]["replicas"], values[component]["replicas"])
            self.assertNotIn(name_of(component), hpas)
        self.assertIn(name_of("gateway"), hpas)

    def test_extra_hpa_metrics_are_appended(self):
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": "vlm_decoder_queue_depth"},
                "target": {"type": "AverageValue", "averageValue": "2"},
            },
        }
        hpas = objects(render({"decoder": {"autoscaling": {"metrics": [metric]}}}), "HorizontalPodAutoscaler")
        self.assertIn(metric, hpas[name_of("decoder")]["spec"]["metrics"])
        self.assertNotIn(metric, hpas[name_of("encoder")]["spec"]["metrics"])

    def test_pdb_per_component(self):
        pdbs = objects(render(production_values()), "PodDisruptionBudget")
        for component in COMPONENTS:
            pdb = pdbs[name_of(component)]
            self.assertEqual(
                pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"], component
            )


class PodsAndServices(unittest.TestCase):
    def each_render(self):
        for label, values in (("default", None), ("production", production_values())):
            yield label, values, render(values)

    def test_probes_use_grpc_health_on_the_health_port(self):
        for label, _, docs in self.each_render():
            deployments = objects(docs, "Deployment")
            for component in COMPONENTS:
                with self.subTest(values=label, component=component):
                    c = mesh_container(deployments[name_of(component)])
                    health_port = int(arg(c, "--health-listen").rsplit(":", 1)[1])
                    self.assertIn({"name": "health", "containerPort": health_port, "protocol": "TCP"}, c["ports"])
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        p = c[probe]
                        self.assertEqual(set(p) & {"grpc", "httpGet", "tcpSocket", "exec"}, {"grpc"}, probe)
                        self.assertEqual(p["grpc"]["port"], health_port, probe)
                    # Readiness asks for the stage's own gRPC service (NOT_SERVING while draining).
                    self.assertEqual(
                        c["readinessProbe"]["grpc"]["service"], f"vlm.v1.{component.capitalize()}"
                    )
                    # The gRPC port itself stays mTLS: the probe port is a different one.
                    grpc_port = int(arg(c, "--listen").rsplit(":", 1)[1])
                    self.assertNotEqual(grpc_port, health_port)

    def test_internal_services_are_headless_and_the_gateway_dials_them(self):
        for label, values, docs in self.each_render():
            services = objects(docs, "Service")
            gateway = mesh_container(objects(docs, "Deployment")[name_of("gateway")])
            for component in INTERNAL:
                with self.subTest(values=label, component=component):
                    svc = services[name_of(component)]
                    self.assertEqual(svc["spec"]["clusterIP"], "None")
                    self.assertEqual(svc["spec"]["selector"]["app.kubernetes.io/component"], component)
                    url = arg(gateway, f"--{component}")
                    # dns://: every pod behind the headless name, re-resolved and balanced by the gateway.
                    m = re.fullmatch(r"dns://([^:/]+):(\d+)", url)
                    self.assertIsNotNone(m, url)
                    self.assertEqual(m.group(1), name_of(component))
                    self.assertEqual(int(m.group(2)), svc["spec"]["ports"][0]["port"])
                    target = mesh_container(objects(docs, "Deployment")[name_of(component)])
                    self.assertEqual(int(arg(target, "--listen").rsplit(":", 1)[1]), int(m.group(2)))
            # The public gateway Service is the one that is not headless.
            self.assertNotEqual(services[name_of("gateway")]["spec"].get("clusterIP"), "None")

    def test_every_container_runs_as_non_root(self):
        values = {
            "jaeger": {"enabled": True},
            "model": {
                "initContainers": [
                    {"name": "fetch", "image": "busybox:1.36", "command": ["true"]},
                ]
            },
        }
        for label, docs in (("default", render(None)), ("production", render(production_values())), ("all on", render(values))):
            specs = pod_specs(docs)
            self.assertGreaterEqual(len(specs), 4)
            for workload, spec in specs:
                pod = spec.get("securityContext", {})
                for c in spec.get("initContainers", []) + spec["containers"]:
                    with self.subTest(values=label, workload=workload, container=c["name"]):
                        sc = c.get("securityContext", {})
                        run_as_non_root = sc.get("runAsNonRoot", pod.get("runAsNonRoot"))
                        run_as_user = sc.get("runAsUser", pod.get("runAsUser"))
                        self.assertTrue(run_as_non_root)
                        self.assertIsNotNone(run_as_user)
                        self.assertNotEqual(run_as_user, 0)
                        if c in spec["containers"]:
                            self.assertIs(sc.get("allowPrivilegeEscalation"), False)
                            self.assertIs(sc.get("readOnlyRootFilesystem"), True)
                            self.assertEqual(sc.get("capabilities", {}).get("drop"), ["ALL"])
                            self.assertNotIn("privileged", [k for k, v in sc.items() if v is True])

    def test_numeric_flags_render_as_integers(self):
        """Helm may hold numbers as float64, which print as 2.097152e+07: clap would refuse that."""
        big = {
            "gateway": {"maxImageBytes": 104857600, "requestTimeoutSeconds": 86400000},
            "encoder": {"maxImageBytes": 20971520, "maxImagePixels": 100000000, "maxImageAspectRatio": 1000},
            "cache": {"ttlSeconds": 2592000, "maxBytes": 4294967296},
        }
        numeric = re.compile(r"--(max-[a-z-]+|cache-ttl|cache-max-bytes|request-timeout|default-max-tokens)")
        for label, values in (("default", None), ("large", big)):
            deployments = objects(render(values), "Deployment")
            for component in COMPONENTS:
                args = mesh_container(deployments[name_of(component)])["args"]
                flags = [a for a in args if numeric.fullmatch(a)]
                self.assertTrue(flags, component)
                for flag in flags:
                    with self.subTest(values=label, component=component, flag=flag):
                        self.assertRegex(arg({"args": args}, flag), r"^[0-9]+$")
        encoder = mesh_container(objects(render(big), "Deployment")[name_of("encoder")])
        self.assertEqual(arg(encoder, "--max-image-pixels"), "100000000")
        self.assertEqual(arg(encoder, "--max-image-aspect-ratio"), "1000")

    def test_topology_spread_and_resources(self):
        for label, _, docs in self.each_render():
            for component in COMPONENTS:
                with self.subTest(values=label, component=component):
                    spec = objects(docs, "Deployment")[name_of(component)]["spec"]["template"]["spec"]
                    spread = spec["topologySpreadConstraints"]
                    self.assertTrue(spread)
                    for s in spread:
                        self.assertEqual(s["labelSelector"]["matchLabels"]["app.kubernetes.io/component"], component)
                    res = mesh_container({"spec": {"template": {"spec": spec}}})["resources"]
                    self.assertIn("cpu", res["requests"])
                    self.assertIn("memory", res["limits"])


class CertificatesRedisTelemetry(unittest.TestCase):
    def test_certificates_match_mounts_and_server_names(self):
        values = production_values()
        docs = render(values)
        certs = objects(docs, "Certificate")
        deployments = objects(docs, "Deployment")
        gateway = mesh_container(deployments[name_of("gateway")])
        for component in COMPONENTS:
            with self.subTest(component=component):
                cert = certs[name_of(component)]["spec"]
                self.assertEqual(cert["issuerRef"]["name"], values["certManager"]["issuerRef"]["name"])
                self.assertEqual(cert["issuerRef"]["kind"], "ClusterIssuer")
                self.assertEqual({"server auth", "client auth"} - set(cert["usages"]), set())
                # The role the stages check callers against (--allowed-callers).
                self.assertEqual(cert["uris"], [f"spiffe://vlm-mesh/{component}"])
                volumes = {v["name"]: v for v in deployments[name_of(component)]["spec"]["template"]["spec"]["volumes"]}
                self.assertEqual(volumes["tls"]["secret"]["secretName"], cert["secretName"])
                c = mesh_container(deployments[name_of(component)])
                mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
                for flag, key in (("--ca", "ca.crt"), ("--cert", "tls.crt"), ("--key", "tls.key")):
                    self.assertEqual(arg(c, flag), f"{mount['mountPath']}/{key}")
                if component != "gateway":
                    # The gateway verifies this name in the stage's certificate.
                    host = re.match(r"dns://([^:/]+)", arg(gateway, f"--{component}")).group(1)
                    self.assertIn(host, cert["dnsNames"])
                    self.assertIn(f"{host}.{NAMESPACE}.svc.cluster.local", cert["dnsNames"])
        gw = certs[name_of("gateway")]["spec"]
        self.assertIn("localhost", gw["dnsNames"])
        for extra in values["certManager"]["gatewayDnsNames"]:
            self.assertIn(extra, gw["dnsNames"])
        # An external issuer: the chart makes no CA of its own.
        self.assertEqual(objects(docs, "Issuer"), {})

    def test_stages_accept_only_the_allowed_callers(self):
        for values, want in ((None, "gateway"), ({"tls": {"allowedCallers": "gateway,client"}}, "gateway,client")):
            deployments = objects(render(values), "Deployment")
            for component in COMPONENTS:
                with self.subTest(values=values, component=component):
                    e = env(mesh_container(deployments[name_of(component)]))
                    if component == "gateway":
                        # The public API: any caller (its own default).
                        self.assertNotIn("VLM_ALLOWED_CALLERS", e)
                    else:
                        self.assertEqual(e["VLM_ALLOWED_CALLERS"]["value"], want)

    def test_self_signed_ca_when_no_issuer_is_given(self):
        docs = render({"certManager": {"enabled": True}})
        issuers = objects(docs, "Issuer")
        ca = objects(docs, "Certificate")[f"{RELEASE}-vlm-mesh-ca"]["spec"]
        self.assertTrue(ca["isCA"])
        self.assertIn("selfSigned", issuers[ca["issuerRef"]["name"]]["spec"])
        for component in COMPONENTS:
            spec = objects(docs, "Certificate")[name_of(component)]["spec"]
            self.assertEqual(issuers[spec["issuerRef"]["name"]]["spec"]["ca"]["secretName"], ca["secretName"])
            self.assertEqual(spec["uris"], [f"spiffe://vlm-mesh/{component}"])
        # The CA itself has no role.
        self.assertNotIn("uris", ca)

    def test_secrets_named_in_values_are_mounted(self):
        names = {c: f"mesh-{c}-cert" for c in COMPONENTS}
        docs = render({"tls": {"secretNames": names}})
        self.assertEqual(objects(docs, "Certificate"), {})
        for component in COMPONENTS:
            volumes = objects(docs, "Deployment")[name_of(component)]["spec"]["template"]["spec"]["volumes"]
            tls = next(v for v in volumes if v["name"] == "tls")
            self.assertEqual(tls["secret"]["secretName"], names[component])

    def test_bundled_redis_is_lru_and_wired_to_the_gateways(self):
        docs = render(None)
        redis = objects(docs, "Deployment")[name_of("redis")]
        (c,) = redis["spec"]["template"]["spec"]["containers"]
        self.assertEqual(redis["spec"]["replicas"], 1)
        self.assertEqual(c["args"][c["args"].index("--maxmemory-policy") + 1], "allkeys-lru")
        svc = objects(docs, "Service")[name_of("redis")]
        gateway = mesh_container(objects(docs, "Deployment")[name_of("gateway")])
        self.assertEqual(
            env(gateway)["VLM_REDIS"]["value"],
            f"redis://:$(REDIS_PASSWORD)@{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}",
        )
        for component in INTERNAL:
            self.assertNotIn("VLM_REDIS", env(mesh_container(objects(docs, "Deployment")[name_of(component)])))

    def test_bundled_redis_requires_a_password_the_gateways_are_given(self):
        docs = render(None)
        secret = objects(docs, "Secret")[f"{name_of('redis')}-auth"]
        password = base64.b64decode(secret["data"]["password"]).decode()
        self.assertRegex(password, r"^[A-Za-z0-9]{40}$")
        (c,) = objects(docs, "Deployment")[name_of("redis")]["spec"]["template"]["spec"]["containers"]
        self.assertEqual(c["args"][c["args"].index("--requirepass") + 1], "$(REDIS_PASSWORD)")
        ref = {"name": secret["metadata"]["name"], "key": "password"}
        for e in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
            self.assertEqual(env(c)[e]["valueFrom"]["secretKeyRef"], ref, e)
        gateway = mesh_container(objects(docs, "Deployment")[name_of("gateway")])
        names = [e["name"] for e in gateway["env"]]
        # Kubernetes expands $(REDIS_PASSWORD) in VLM_REDIS only if it is defined before it.
        self.assertLess(names.index("REDIS_PASSWORD"), names.index("VLM_REDIS"))
        self.assertEqual(env(gateway)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"], ref)
        own = render({"redis": {"bundled": {"auth": {"existingSecret": "my-redis", "key": "pw"}}}})
        self.assertNotIn(f"{name_of('redis')}-auth", objects(own, "Secret"))
        gateway = mesh_container(objects(own, "Deployment")[name_of("gateway")])
        self.assertEqual(env(gateway)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"], {"name": "my-redis", "key": "pw"})

    def test_gateways_tag_cached_features_with_a_secret_key(self):
        docs = render(None)
        secret = objects(docs, "Secret")[f"{RELEASE}-vlm-mesh-cache-secret"]
        self.assertRegex(base64.b64decode(secret["data"]["secret"]).decode(), r"^[A-Za-z0-9]{48}$")
        deployment = objects(docs, "Deployment")[name_of("gateway")]
        gateway = mesh_container(deployment)
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "cache-secret")
        self.assertEqual(volume["secret"]["secretName"], secret["metadata"]["name"])
        mount = next(m for m in gateway["volumeMounts"] if m["name"] == "cache-secret")
        self.assertTrue(mount["readOnly"])
        self.assertEqual(arg(gateway, "--cache-secret-file"), f"{mount['mountPath']}/secret")
        for component in INTERNAL:
            c = mesh_container(objects(docs, "Deployment")[name_of(component)])
            self.assertNotIn("--cache-secret-file", c["args"])
        own = render({"cache": {"secret": {"existingSecret": "mesh-cache-key", "key": "k"}}})
        self.assertNotIn(f"{RELEASE}-vlm-mesh-cache-secret", objects(own, "Secret"))
        deployment = objects(own, "Deployment")[name_of("gateway")]
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "cache-secret")
        self.assertEqual(volume["secret"]["secretName"], "mesh-cache-key")
        self.assertEqual(arg(mesh_container(deployment), "--cache-secret-file"), f"{mount['mountPath']}/k")
        off = render({"cache": {"enabled": False}})
        self.assertNotIn("--cache-secret-file", mesh_container(objects(off, "Deployment")[name_of("gateway")])["args"])

    def test_network_policies_let_only_gateways_reach_the_stages_and_redis(self):
        docs = render(None)
        policies = objects(docs, "NetworkPolicy")
        gateway_pods = objects(docs, "Deployment")[name_of("gateway")]["spec"]["selector"]["matchLabels"]
        self.assertNotIn(name_of("gateway"), policies)
        for target, port in [("encoder", "grpc"), ("projector", "grpc"), ("decoder", "grpc"), ("redis", "redis")]:
            with self.subTest(target=target):
                p = policies[name_of(target)]["spec"]
                pods = objects(docs, "Deployment")[name_of(target)]["spec"]["selector"]["matchLabels"]
                self.assertEqual(p["podSelector"]["matchLabels"], pods)
                self.assertEqual(p["policyTypes"], ["Ingress"])
                guarded = [r for r in p["ingress"] if any(x["port"] == port for x in r["ports"])]
                self.assertEqual(len(guarded), 1, p)
                self.assertEqual(guarded[0]["from"], [{"podSelector": {"matchLabels": gateway_pods}}])
                # Every other rule opens only the plaintext health or metrics port, to anyone by
                # default (the kubelet's probes, Prometheus).
                others = [r for r in p["ingress"] if r is not guarded[0]]
                want = [] if target == "redis" else ["health", "metrics"]
                self.assertEqual(sorted(x["port"] for r in others for x in r["ports"]), want)
                self.assertTrue(all(len(r["ports"]) == 1 and "from" not in r for r in others), others)
        self.assertEqual(objects(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy"), {})
        # metrics.networkPolicy.from narrows the metrics port to the given sources.
        peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        narrowed = objects(render({"metrics": {"networkPolicy": {"from": [peer]}}}), "NetworkPolicy")
        for target in INTERNAL:
            (rule,) = [r for r in narrowed[name_of(target)]["spec"]["ingress"] if r["ports"][0]["port"] == "metrics"]
            self.assertEqual(rule["from"], [peer])
        off = objects(render({"metrics": {"enabled": False}}), "NetworkPolicy")
        for target in INTERNAL:
            ports = [x["port"] for r in off[name_of(target)]["spec"]["ingress"] for x in r["ports"]]
            self.assertNotIn("metrics", ports)

    def test_external_redis_replaces_the_bundled_one(self):
        values = production_values()
        docs = render(values)
        self.assertNotIn(name_of("redis"), objects(docs, "Deployment"))
        gateway = mesh_container(objects(docs, "Deployment")[name_of("gateway")])
        self.assertEqual(env(gateway)["VLM_REDIS"]["value"], values["redis"]["externalUrl"])
        secret = {"redis": {"existingSecret": {"name": "redis-auth", "key": "url"}}}
        gateway = mesh_container(objects(render(secret), "Deployment")[name_of("gateway")])
        self.assertEqual(
            env(gateway)["VLM_REDIS"]["valueFrom"]["secretKeyRef"], {"name": "redis-auth", "key": "url"}
        )

    def test_no_cache_means_no_redis(self):
        docs = render({"cache": {"enabled": False}})
        gateway = mesh_container(objects(docs, "Deployment")[name_of("gateway")])
        self.assertIn("--no-cache", gateway["args"])
        self.assertNotIn("VLM_REDIS", env(gateway))  # --no-cache conflicts with --redis
        self.assertNotIn(name_of("redis"), objects(docs, "Deployment"))

    def test_otlp_endpoint_reaches_every_component(self):
        docs = render({"jaeger": {"enabled": True}})
        jaeger = objects(docs, "Service")[name_of("jaeger")]
        port = next(p["port"] for p in jaeger["spec"]["ports"] if p["name"] == "otlp-grpc")
        for component in COMPONENTS:
            e = env(mesh_container(objects(docs, "Deployment")[name_of(component)]))
            self.assertEqual(e["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"], f"http://{jaeger['metadata']['name']}:{port}")
            self.assertEqual(e["OTEL_SERVICE_NAME"]["value"], f"vlm-{component}")
        values = production_values()
        for component in COMPONENTS:
            e = env(mesh_container(objects(render(values), "Deployment")[name_of(component)]))
            self.assertEqual(e["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"], values["otel"]["endpoint"])
        # Nothing configured: no exporter endpoint at all.
        e = env(mesh_container(objects(render(None), "Deployment")[name_of("decoder")]))
        self.assertNotIn("OTEL_EXPORTER_OTLP_ENDPOINT", e)

    def test_notes_tell_how_to_call_the_gateway(self):
        text = notes(None)
        self.assertIn(f"port-forward svc/{name_of('gateway')}", text)
        self.assertIn("vlm-mesh ask --gateway https://localhost:50051 --ca", text)
        self.assertIn(f"{name_of('gateway')}-tls", text)


class MetricsOpenAIAndModel(unittest.TestCase):
    """The metrics port, the ServiceMonitor, the OpenAI port, the compute dtype and quantization."""

    def metrics_service(self, docs: list[dict], component: str) -> dict:
        """The Service Prometheus reaches a component's pods through."""
        name = name_of(component) + ("-metrics" if component == "gateway" else "")
        return objects(docs, "Service")[name]

    def test_metrics_port_is_listened_on_exposed_and_annotated(self):
        for label, values, want in (
            ("default", None, 9090),
            ("production", production_values(), 9090),
            ("other port", {"ports": {"metrics": 9100}}, 9100),
        ):
            docs = render(values)
            deployments = objects(docs, "Deployment")
            for component in COMPONENTS:
                with self.subTest(values=label, component=component):
                    c = mesh_container(deployments[name_of(component)])
                    listen = arg(c, "--metrics-listen")
                    self.assertEqual(listen, f"0.0.0.0:{want}")
                    self.assertEqual(named_port(c["ports"], "metrics"), {"name": "metrics", "containerPort": want, "protocol": "TCP"})
                    svc = self.metrics_service(docs, component)
                    port = named_port(svc["spec"]["ports"], "metrics")
                    self.assertEqual((port["port"], port["targetPort"]), (want, "metrics"))
                    self.assertTrue(selects({"matchLabels": svc["spec"]["selector"]}, deployments[name_of(component)]["spec"]["template"]["metadata"]["labels"]))
                    # One address per pod: Prometheus scrapes pods, not a virtual IP.
                    self.assertEqual(svc["spec"]["clusterIP"], "None")
                    annotations = deployments[name_of(component)]["spec"]["template"]["metadata"]["annotations"]
                    self.assertEqual(annotations["prometheus.io/scrape"], "true")
                    self.assertEqual(annotations["prometheus.io/port"], str(want))
                    self.assertEqual(annotations["prometheus.io/path"], "/metrics")
            # The public gateway Service (a LoadBalancer in production) never carries the plaintext port.
            self.assertIsNone(named_port(objects(docs, "Service")[name_of("gateway")]["spec"]["ports"], "metrics"))

    def test_metrics_can_be_turned_off_and_annotations_overridden(self):
        docs = render({"metrics": {"enabled": False}})
        self.assertNotIn(name_of("gateway") + "-metrics", objects(docs, "Service"))
        for component in COMPONENTS:
            d = objects(docs, "Deployment")[name_of(component)]
            c = mesh_container(d)
            self.assertNotIn("--metrics-listen", c["args"])
            self.assertIsNone(named_port(c["ports"], "metrics"))
            self.assertNotIn("prometheus.io/scrape", d["spec"]["template"]["metadata"].get("annotations", {}))
        docs = render({"metrics": {"scrapeAnnotations": False}, "encoder": {"podAnnotations": {"team": "ml"}}})
        d = objects(docs, "Deployment")[name_of("encoder")]
        self.assertEqual(d["spec"]["template"]["metadata"]["annotations"], {"team": "ml"})
        self.assertIn("--metrics-listen", mesh_container(d)["args"])
        # A component's own podAnnotations win over the chart's.
        docs = render({"decoder": {"podAnnotations": {"prometheus.io/scrape": "false"}}})
        annotations = objects(docs, "Deployment")[name_of("decoder")]["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual(annotations["prometheus.io/scrape"], "false")
        self.assertEqual(annotations["prometheus.io/port"], "9090")

    def test_service_monitor_renders_only_when_enabled(self):
        for values in (None, production_values(), {"metrics": {"serviceMonitor": {"enabled": False}}}):
            self.assertEqual(objects(render(values), "ServiceMonitor"), {})
        values = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}, "interval": "15s"}}}
        docs = render(values)
        (monitor,) = objects(docs, "ServiceMonitor").values()
        self.assertEqual(monitor["metadata"]["labels"]["release"], "kps")
        self.assertEqual(monitor["spec"]["namespaceSelector"], {"matchNames": [NAMESPACE]})
        (endpoint,) = monitor["spec"]["endpoints"]
        self.assertEqual((endpoint["port"], endpoint["path"], endpoint["interval"]), ("metrics", "/metrics", "15s"))
        self.assertNotIn("scrapeTimeout", endpoint)
        # The Services it selects that have a "metrics" port: exactly one per component.
        scraped = [
            component_of(svc)
            for svc in objects(docs, "Service").values()
            if selects(monitor["spec"]["selector"], svc["metadata"]["labels"])
            and named_port(svc["spec"]["ports"], "metrics")
        ]
        self.assertEqual(sorted(scraped), sorted(COMPONENTS))
        with self.assertRaisesRegex(helm.HelmError, "serviceMonitor.enabled needs metrics.enabled"):
            render({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}})

    def test_openai_port_when_enabled(self):
        docs = render(None)
        gateway = mesh_container(objects(docs, "Deployment")[name_of("gateway")])
        self.assertNotIn("--http-listen", gateway["args"])
        self.assertIsNone(named_port(objects(docs, "Service")[name_of("gateway")]["spec"]["ports"], "openai"))
        for label, values, plaintext in (
            ("tls", {"gateway": {"openai": {"enabled": True}}}, False),
            ("plaintext", {"gateway": {"plaintext": True, "openai": {"enabled": True, "port": 8443, "servicePort": 443}}}, True),
        ):
            with self.subTest(values=label):
                docs = render(values)
                want = values["gateway"]["openai"]
                deployments = objects(docs, "Deployment")
                gateway = mesh_container(deployments[name_of("gateway")])
                listen = port_of(arg(gateway, "--http-listen"))
                self.assertEqual(listen, want.get("port", 8080))
                self.assertEqual(named_port(gateway["ports"], "openai")["containerPort"], listen)
                svc = named_port(objects(docs, "Service")[name_of("gateway")]["spec"]["ports"], "openai")
                self.assertEqual((svc["port"], svc["targetPort"]), (want.get("servicePort", 8080), "openai"))
                # The binary serves the HTTP port with the gRPC port's TLS, off only with --plaintext.
                self.assertEqual(svc["appProtocol"], "http" if plaintext else "https")
                self.assertEqual("--plaintext" in gateway["args"], plaintext)
                self.assertNotIn("--allow-image-urls", gateway["args"])
                for component in INTERNAL:
                    c = mesh_container(deployments[name_of(component)])
                    self.assertNotIn("--http-listen", c["args"])
                    self.assertIsNone(named_port(c["ports"], "openai"))
        urls = {"gateway": {"openai": {"enabled": True, "allowImageUrls": True, "allowPrivateImageUrls": True}}}
        args = mesh_container(objects(render(urls), "Deployment")[name_of("gateway")])["args"]
        self.assertIn("--allow-image-urls", args)
        self.assertIn("--allow-private-image-urls", args)
        with self.assertRaisesRegex(helm.HelmError, "allowPrivateImageUrls needs"):
            render({"gateway": {"openai": {"enabled": True, "allowPrivateImageUrls": True}}})
        with self.assertRaisesRegex(helm.HelmError, "ports.metrics and gateway.openai.port are both 9090"):
            render({"gateway": {"openai": {"enabled": True, "port": 9090}}})

    def test_default_dtype_is_f16(self):
        defaults = yaml.safe_load((CHART / "values.yaml").read_text())
        self.assertEqual(defaults["model"]["dtype"], "f16")
        deployments = objects(render(None), "Deployment")
        for component in INTERNAL:
            with self.subTest(component=component):
                self.assertEqual(arg(mesh_container(deployments[name_of(component)]), "--dtype"), "f16")
        deployments = objects(render({"model": {"dtype": "f32"}}), "Deployment")
        self.assertEqual(arg(mesh_container(deployments[name_of("decoder")]), "--dtype"), "f32")

    def test_default_memory_fits_the_default_model(self):
        """LLaVA-1.5-7B in f16: 13.5 GB of decoder weights, 0.6 GB of vision tower; the limit
        leaves room above the weights for the KV cache (half of what is left, by default)."""
        deployments = objects(render(None), "Deployment")
        weights_gib = {"decoder": 13.5e9 / 2**30, "encoder": 0.61e9 / 2**30}
        for component, weights in weights_gib.items():
            with self.subTest(component=component):
                res = mesh_container(deployments[name_of(component)])["resources"]
                request, limit = gib(res["requests"]["memory"]), gib(res["limits"]["memory"])
                self.assertGreater(request, weights + 0.5)
                self.assertGreaterEqual(limit, request)
                self.assertGreaterEqual(limit - weights, 2 * 4.0 if component == "decoder" else 1.0)

    def test_quantize_reaches_the_args(self):
        deployments = objects(render(None), "Deployment")
        for component in INTERNAL:
            self.assertEqual(arg(mesh_container(deployments[name_of(component)]), "--quantize"), "none")
        # The gateway loads no weights and has no --quantize.
        self.assertNotIn("--quantize", mesh_container(deployments[name_of("gateway")])["args"])
        values = {"encoder": {"quantize": "q8_0"}, "decoder": {"quantize": "q4_k"}}
        deployments = objects(render(values), "Deployment")
        got = {
            c: (arg(mesh_container(deployments[name_of(c)]), "--quantize"), arg(mesh_container(deployments[name_of(c)]), "--dtype"))
            for c in INTERNAL
        }
        # Quantized weights compute in f32 (the binary refuses --quantize with f16); the others
        # keep model.dtype.
        self.assertEqual(got, {"encoder": ("q8_0", "f32"), "projector": ("none", "f16"), "decoder": ("q4_k", "f32")})


    def test_only_the_model_stages_mount_the_model(self):
        """The gateway reads no checkpoint: no model volume, no init containers that fill one."""
        values = {
            "model": {
                "volume": {"emptyDir": {"sizeLimit": "20Gi"}},
                "initContainers": [{"name": "fetch", "image": "busybox:1.36", "command": ["true"]}],
            }
        }
        deployments = objects(render(values), "Deployment")
        for component in ("gateway",) + tuple(INTERNAL):
            spec = deployments[name_of(component)]["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["name"]: m for m in mesh_container(deployments[name_of(component)])["volumeMounts"]}
            inits = [c["name"] for c in spec.get("initContainers", [])]
            with self.subTest(component=component):
                if component == "gateway":
                    self.assertNotIn("model", volumes)
                    self.assertNotIn("model", mounts)
                    self.assertEqual(inits, [])
                else:
                    self.assertEqual(volumes["model"]["emptyDir"], {"sizeLimit": "20Gi"})
                    self.assertEqual(mounts["model"], {"name": "model", "mountPath": "/models", "readOnly": True})
                    self.assertEqual(inits, ["fetch"])
                # Every process still gets --model: the gateway names the model after it.
                self.assertEqual(arg(mesh_container(deployments[name_of(component)]), "--model"), "/models/llava-1.5-7b-hf")

    def test_openai_names_and_api_key_secret(self):
        values = {"gateway": {"openai": {"enabled": True, "servedModelNames": ["autoglm-phone-9b", "glm"],
                                         "apiKeySecret": {"name": "openai-key", "key": "token"}}}}
        gateway = mesh_container(objects(render(values), "Deployment")[name_of("gateway")])
        self.assertEqual(arg(gateway, "--served-model-name"), "autoglm-phone-9b,glm")
        env = {e["name"]: e for e in gateway["env"]}
        self.assertEqual(env["VLM_API_KEY"]["valueFrom"]["secretKeyRef"], {"name": "openai-key", "key": "token"})
        self.assertNotIn("--api-key", gateway["args"])
        # Off by default: no names, no key.
        gateway = mesh_container(objects(render({"gateway": {"openai": {"enabled": True}}}), "Deployment")[name_of("gateway")])
        self.assertNotIn("--served-model-name", gateway["args"])
        self.assertNotIn("VLM_API_KEY", {e["name"] for e in gateway["env"]})

    def test_watch_limits_reach_the_gateway(self):
        gateway = mesh_container(objects(render(None), "Deployment")[name_of("gateway")])
        self.assertEqual(arg(gateway, "--max-watch-streams"), "16")
        self.assertEqual(arg(gateway, "--frame-threshold"), "2")
        values = {"gateway": {"watch": {"maxStreams": 3, "frameThreshold": 0.5}}}
        gateway = mesh_container(objects(render(values), "Deployment")[name_of("gateway")])
        self.assertEqual(arg(gateway, "--max-watch-streams"), "3")
        self.assertEqual(arg(gateway, "--frame-threshold"), "0.5")


class Dockerfile(unittest.TestCase):
    """No Docker engine here: check that the image builds the binary the way CI does."""

    def setUp(self):
        self.dockerfile = (REPO / "Dockerfile").read_text()

    def test_cargo_invocation_matches_ci(self):
        build = re.search(r"cargo build ([^\\\n&]*)", self.dockerfile).group(1).split()
        ci = (REPO / "scripts" / "test.sh").read_text()
        ci_cmd = re.search(r"cargo test ([^\n\"]*)", ci).group(1).split()
        self.assertIn("--locked", build)  # the committed Cargo.lock, as CI
        self.assertIn("--locked", ci_cmd)
        self.assertIn("--bin", build)
        binary = build[build.index("--bin") + 1]
        manifest = (REPO / "services" / "vlm-mesh" / "Cargo.toml").read_text()
        self.assertRegex(manifest, rf'\[\[bin\]\]\s*name = "{binary}"')
        # The toolchain of the build stage satisfies the workspace's rust-version.
        rust = re.search(r"ARG RUST_VERSION=(\d+)\.(\d+)", self.dockerfile)
        ws = re.search(r'rust-version = "(\d+)\.(\d+)"', (REPO / "Cargo.toml").read_text())
        self.assertGreaterEqual(tuple(map(int, rust.groups())), tuple(map(int, ws.groups())))

    def test_runtime_stage_is_non_root_and_carries_only_the_binary(self):
        stages = re.split(r"^FROM ", self.dockerfile, flags=re.M)[1:]
        self.assertEqual(len(stages), 2, "multi-stage: build, then runtime")
        runtime = stages[-1]
        self.assertRegex(runtime, r"(?m)^USER 65532:65532$")
        copies = re.findall(r"(?m)^COPY .*$", runtime)
        self.assertEqual(copies, ["COPY --from=build /out/vlm-mesh /usr/local/bin/vlm-mesh"])
        self.assertRegex(runtime, r'ENTRYPOINT \["/usr/local/bin/vlm-mesh"\]')
        ignore = (REPO / ".dockerignore").read_text().split()
        # Models are mounted, never baked in; only the demo model the binary compiles in
        # (include_bytes!) is let into the build context.
        self.assertIn("models/*", ignore)
        self.assertEqual([l for l in ignore if l.startswith("!")], ["!models/shapes-llava"])
        self.assertIn("target/", ignore)

    def test_chart_uses_the_image_ports(self):
        exposed = set(map(int, re.search(r"(?m)^EXPOSE (.*)$", self.dockerfile).group(1).split()))
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        ports = values["ports"]
        openai = values["gateway"]["openai"]["port"]
        self.assertEqual(exposed, {ports["grpc"], ports["health"], ports["metrics"], openai})


if __name__ == "__main__":
    unittest.main()
