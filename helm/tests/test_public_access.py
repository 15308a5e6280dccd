"""The gateway's public side (issue 42): a public certificate other than the mesh one
(`gateway.publicTls`), a plaintext HTTP port for a TLS-terminating proxy (`gateway.httpPlaintext`),
an Ingress (`ingress`) and Gateway API routes (`gatewayApi`). Every object rendered is validated
(Kubernetes schemas, cert-manager's CRD models, the Gateway API schema in gateway_api.py), and
every route is followed from its backend to the container port the gateway listens on."""

from __future__ import annotations

import copy
import unittest

import helm_python as helm
import jsonschema

from test_chart import (
    CHART,
    INTERNAL,
    arg,
    kube_versions,
    mesh_container,
    name_of,
    named_port,
    objects,
    port_of,
    render,
    selects,
    validate_manifest,
)

INGRESS_NS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
PUBLIC_CERT = {
    "certificate": {
        "enabled": True,
        "issuerRef": {"name": "letsencrypt-prod", "kind": "ClusterIssuer", "group": "cert-manager.io"},
        "dnsNames": ["vlm.example.com"],
    }
}
EVERYTHING = {
    "gateway": {
        "service": {"type": "LoadBalancer", "port": 443},
        "openai": {"enabled": True, "apiKeySecret": {"name": "openai-key", "key": "k"}},
        "httpPlaintext": {"enabled": True, "port": 8095, "from": [INGRESS_NS]},
        "publicTls": PUBLIC_CERT,
    },
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "hosts": ["vlm.example.com"],
        "tls": [{"hosts": ["vlm.example.com"], "secretName": "vlm-ingress-tls"}],
        "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt-prod"},
    },
    "gatewayApi": {
        "parentRefs": [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}],
        "hostnames": ["vlm.example.com"],
        "httpRoute": {"enabled": True},
        "grpcRoute": {"enabled": True},
    },
}


def gateway_of(docs: list[dict]) -> dict:
    return mesh_container(objects(docs, "Deployment")[name_of("gateway")])


def container_port_behind(docs: list[dict], service: str, port: int) -> int:
    """Follows Service `service`'s port `port` to the gateway container port it targets."""
    svc = objects(docs, "Service")[service]
    (p,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    deployment = objects(docs, "Deployment")[name_of("gateway")]
    # The Service selects the gateway pods, and only them.
    assert selects({"matchLabels": svc["spec"]["selector"]}, deployment["spec"]["template"]["metadata"]["labels"])
    target = p["targetPort"]
    if isinstance(target, int):
        return target
    return named_port(mesh_container(deployment)["ports"], target)["containerPort"]


class PublicAccess(unittest.TestCase):
    def test_all_of_it_renders_valid(self):
        lint = helm.lint(CHART, EVERYTHING, strict=True, kube_version="v" + kube_versions()[0] + ".0")
        self.assertEqual(lint["errors"], [], lint)
        self.assertEqual([m for m in lint["messages"] if m["severity"] >= 2], [], lint)
        docs = render(EVERYTHING)
        kinds = {d["kind"] for d in docs}
        self.assertLessEqual({"Ingress", "HTTPRoute", "GRPCRoute", "Certificate", "NetworkPolicy"}, kinds)
        for version in kube_versions():
            for doc in docs:
                with self.subTest(version=version, kind=doc["kind"], name=doc["metadata"]["name"]):
                    validate_manifest(doc, version)

    def test_off_by_default(self):
        docs = render(None)
        for kind in ("Ingress", "HTTPRoute", "GRPCRoute", "Certificate"):
            self.assertEqual(objects(docs, kind), {}, kind)
        self.assertNotIn(name_of("gateway") + "-http", objects(docs, "Service"))
        self.assertNotIn(name_of("gateway"), objects(docs, "NetworkPolicy"))
        gateway = gateway_of(docs)
        for flag in ("--public-cert", "--public-key", "--http-plaintext-listen"):
            self.assertNotIn(flag, gateway["args"])
        self.assertIsNone(named_port(gateway["ports"], "http-plaintext"))
        volumes = objects(docs, "Deployment")[name_of("gateway")]["spec"]["template"]["spec"]["volumes"]
        self.assertNotIn("public-tls", [v["name"] for v in volumes])

    def test_public_tls_secret_is_mounted_and_passed(self):
        for label, values, secret in (
            ("own Secret", {"gateway": {"publicTls": {"secretName": "vlm-public", "mountPath": "/etc/public"}}}, "vlm-public"),
            ("chart's Certificate", {"gateway": {"publicTls": PUBLIC_CERT}}, f"{name_of('gateway')}-public-tls"),
        ):
            with self.subTest(values=label):
                docs = render(values)
                deployment = objects(docs, "Deployment")[name_of("gateway")]
                gateway = mesh_container(deployment)
                (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "public-tls"]
                self.assertEqual(volume["secret"]["secretName"], secret)
                # The keys of a kubernetes.io/tls Secret (cert-manager's, an ACME issuer's).
                self.assertEqual(volume["secret"]["items"], [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}])
                (mount,) = [m for m in gateway["volumeMounts"] if m["name"] == "public-tls"]
                self.assertTrue(mount["readOnly"])
                want = values["gateway"]["publicTls"].get("mountPath", "/etc/vlm-mesh/public-tls")
                self.assertEqual(mount["mountPath"], want)
                self.assertEqual(arg(gateway, "--public-cert"), f"{want}/tls.crt")
                self.assertEqual(arg(gateway, "--public-key"), f"{want}/tls.key")
                # The mesh identity is unchanged: the stages still see the gateway's mesh certificate.
                tls_mount = next(m for m in gateway["volumeMounts"] if m["name"] == "tls")
                self.assertEqual(arg(gateway, "--cert"), f"{tls_mount['mountPath']}/tls.crt")
                self.assertNotEqual(mount["mountPath"], tls_mount["mountPath"])
                for component in INTERNAL:
                    c = mesh_container(objects(docs, "Deployment")[name_of(component)])
                    self.assertNotIn("--public-cert", c["args"])
                    self.assertNotIn("public-tls", [m["name"] for m in c["volumeMounts"]])
                certs = objects(docs, "Certificate")
                if label == "own Secret":
                    self.assertEqual(certs, {})
                else:
                    cert = certs[name_of("gateway") + "-public"]
                    validate_manifest(cert, kube_versions()[-1])
                    self.assertEqual(cert["spec"]["secretName"], secret)
                    self.assertEqual(cert["spec"]["dnsNames"], ["vlm.example.com"])
                    self.assertEqual(cert["spec"]["issuerRef"], PUBLIC_CERT["certificate"]["issuerRef"])
                    # Only public names: an ACME issuer cannot validate cluster-internal ones.
                    self.assertNotIn("ipAddresses", cert["spec"])
                    self.assertNotIn("uris", cert["spec"])

    def test_public_tls_refusals(self):
        with self.assertRaisesRegex(helm.HelmError, "publicTls needs TLS"):
            render({"gateway": {"plaintext": True, "publicTls": {"secretName": "x"}}})
        with self.assertRaisesRegex(helm.HelmError, "issuerRef.name"):
            render({"gateway": {"publicTls": {"certificate": {"enabled": True, "dnsNames": ["a.example.com"]}}}})
        with self.assertRaisesRegex(helm.HelmError, "dnsNames"):
            render({"gateway": {"publicTls": {"certificate": {"enabled": True, "issuerRef": {"name": "le"}}}}})

    def test_plaintext_port_only_when_enabled(self):
        docs = render(EVERYTHING)
        gateway = gateway_of(docs)
        listen = port_of(arg(gateway, "--http-plaintext-listen"))
        self.assertEqual(listen, 8095)
        self.assertEqual(named_port(gateway["ports"], "http-plaintext")["containerPort"], 8095)
        # The TLS ports are unchanged beside it.
        self.assertEqual(port_of(arg(gateway, "--http-listen")), 8080)
        # Its own in-cluster Service; the public (LoadBalancer) gateway Service never carries it.
        svc = objects(docs, "Service")[name_of("gateway") + "-http"]
        self.assertEqual(svc["spec"]["type"], "ClusterIP")
        self.assertEqual(container_port_behind(docs, svc["metadata"]["name"], 8095), listen)
        public = objects(docs, "Service")[name_of("gateway")]
        self.assertEqual(public["spec"]["type"], "LoadBalancer")
        self.assertEqual({p["targetPort"] for p in public["spec"]["ports"]}, {"grpc", "openai"})
        for component in INTERNAL:
            self.assertNotIn("--http-plaintext-listen", mesh_container(objects(docs, "Deployment")[name_of(component)])["args"])
        # Alone (no TLS OpenAI port): the API's options still reach the gateway.
        alone = {"gateway": {"httpPlaintext": {"enabled": True}, "openai": {"servedModelNames": ["glm"], "apiKeySecret": {"name": "key", "key": "k"}}}}
        gateway = gateway_of(render(alone))
        self.assertNotIn("--http-listen", gateway["args"])
        self.assertEqual(port_of(arg(gateway, "--http-plaintext-listen")), 8090)
        self.assertEqual(arg(gateway, "--served-model-name"), "glm")
        self.assertEqual({e["name"]: e for e in gateway["env"]}["VLM_API_KEY"]["valueFrom"]["secretKeyRef"], {"name": "key", "key": "k"})
        with self.assertRaisesRegex(helm.HelmError, "ports.metrics and gateway.httpPlaintext.port are both 9090"):
            render({"gateway": {"httpPlaintext": {"enabled": True, "port": 9090}}})

    def test_network_policy_narrows_only_the_plaintext_port(self):
        docs = render(EVERYTHING)
        policy = objects(docs, "NetworkPolicy")[name_of("gateway")]["spec"]
        pods = objects(docs, "Deployment")[name_of("gateway")]["spec"]["selector"]["matchLabels"]
        self.assertEqual(policy["podSelector"]["matchLabels"], pods)
        by_port = {p["port"]: rule for rule in policy["ingress"] for p in rule["ports"]}
        self.assertEqual(by_port["http-plaintext"]["from"], [INGRESS_NS])
        # Every other port the gateway listens on stays open to any source, as without the policy.
        names = {p["name"] for p in gateway_of(docs)["ports"]}
        self.assertEqual(set(by_port), names)
        for port in names - {"http-plaintext"}:
            self.assertNotIn("from", by_port[port], port)
        # No sources named, or no policies at all: nothing selects the gateway pods.
        open_values = copy.deepcopy(EVERYTHING)
        open_values["gateway"]["httpPlaintext"]["from"] = []
        self.assertNotIn(name_of("gateway"), objects(render(open_values), "NetworkPolicy"))
        off = copy.deepcopy(EVERYTHING)
        off["networkPolicy"] = {"enabled": False}
        self.assertEqual(objects(render(off), "NetworkPolicy"), {})

    def test_ingress_points_at_the_right_service_port(self):
        for backend, values, flag in (
            ("plaintext", EVERYTHING, "--http-plaintext-listen"),
            ("tls", {"gateway": {"openai": {"enabled": True, "servicePort": 8443}},
                     "ingress": {"enabled": True, "backend": "tls", "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "HTTPS"}}},
             "--http-listen"),
        ):
            with self.subTest(backend=backend):
                docs = render(values)
                (ingress,) = objects(docs, "Ingress").values()
                validate_manifest(ingress, kube_versions()[-1])
                rules = ingress["spec"]["rules"]
                hosts = values["ingress"].get("hosts", [])
                self.assertEqual([r.get("host") for r in rules], hosts or [None])
                for rule in rules:
                    (path,) = rule["http"]["paths"]
                    self.assertEqual((path["path"], path["pathType"]), ("/v1", "Prefix"))
                    service = path["backend"]["service"]
                    target = container_port_behind(docs, service["name"], service["port"]["number"])
                    self.assertEqual(target, port_of(arg(gateway_of(docs), flag)))
                self.assertEqual(ingress["metadata"].get("annotations", {}), values["ingress"].get("annotations", {}))
        with self.assertRaisesRegex(helm.HelmError, "ingress.backend plaintext needs gateway.httpPlaintext.enabled"):
            render({"ingress": {"enabled": True}})
        with self.assertRaisesRegex(helm.HelmError, "ingress.backend tls needs gateway.openai.enabled"):
            render({"ingress": {"enabled": True, "backend": "tls"}})

    def test_gateway_api_routes(self):
        docs = render(EVERYTHING)
        api = EVERYTHING["gatewayApi"]
        http = objects(docs, "HTTPRoute")[name_of("gateway")]
        grpc = objects(docs, "GRPCRoute")[name_of("gateway")]
        for route in (http, grpc):
            validate_manifest(route, kube_versions()[-1])  # the hand-written Gateway API schema
            self.assertEqual(route["spec"]["parentRefs"], api["parentRefs"])
            self.assertEqual(route["spec"]["hostnames"], api["hostnames"])
        (rule,) = http["spec"]["rules"]
        self.assertEqual(rule["matches"], [{"path": {"type": "PathPrefix", "value": "/v1"}}])
        (ref,) = rule["backendRefs"]
        self.assertEqual(container_port_behind(docs, ref["name"], ref["port"]), port_of(arg(gateway_of(docs), "--http-plaintext-listen")))
        (rule,) = grpc["spec"]["rules"]
        self.assertNotIn("matches", rule)  # every service of the port: Gateway, health, reflection
        (ref,) = rule["backendRefs"]
        self.assertEqual(ref["name"], name_of("gateway"))
        self.assertEqual(container_port_behind(docs, ref["name"], ref["port"]), port_of(arg(gateway_of(docs), "--listen")))
        # The TLS OpenAI port as the HTTPRoute's backend.
        tls = {"gateway": {"openai": {"enabled": True}}, "gatewayApi": {"parentRefs": [{"name": "public"}], "httpRoute": {"enabled": True, "backend": "tls"}}}
        docs = render(tls)
        (ref,) = objects(docs, "HTTPRoute")[name_of("gateway")]["spec"]["rules"][0]["backendRefs"]
        self.assertEqual(container_port_behind(docs, ref["name"], ref["port"]), port_of(arg(gateway_of(docs), "--http-listen")))
        self.assertNotIn("hostnames", objects(docs, "HTTPRoute")[name_of("gateway")]["spec"])
        self.assertEqual(objects(docs, "GRPCRoute"), {})
        with self.assertRaisesRegex(helm.HelmError, "gatewayApi.parentRefs"):
            render({"gatewayApi": {"grpcRoute": {"enabled": True}}})

    def test_the_route_validator_catches_mistakes(self):
        docs = render(EVERYTHING)
        route = copy.deepcopy(objects(docs, "HTTPRoute")[name_of("gateway")])
        route["spec"]["rules"][0]["backendRef"] = route["spec"]["rules"][0].pop("backendRefs")
        with self.assertRaises(jsonschema.ValidationError):
            validate_manifest(route, kube_versions()[-1])
        route = copy.deepcopy(objects(docs, "GRPCRoute")[name_of("gateway")])
        del route["spec"]["rules"][0]["backendRefs"][0]["port"]  # a Service reference needs its port
        with self.assertRaises(jsonschema.ValidationError):
            validate_manifest(route, kube_versions()[-1])
        route["spec"]["rules"][0]["backendRefs"][0]["port"] = 50051
        route["spec"]["hostnames"] = ["VLM.example.com"]  # host names are lower case
        with self.assertRaises(jsonschema.ValidationError):
            validate_manifest(route, kube_versions()[-1])

    def test_schema_refuses_wrong_values(self):
        for bad in (
            {"ingress": {"backend": "https"}},
            {"ingress": {"enable": True}},
            {"ingress": {"path": "v1"}},
            {"gateway": {"httpPlaintext": {"port": "8090"}}},
            {"gateway": {"publicTls": {"secretname": "x"}}},
            {"gateway": {"publicTls": {"certificate": {"dnsNames": ["Bad_Name"]}}}},
            {"gatewayApi": {"httpRoute": {"enable": True}}},
            {"gatewayApi": {"parentRefs": [{"namespace": "x"}]}},
        ):
            with self.subTest(values=bad):
                with self.assertRaises(helm.HelmValuesError):
                    render(bad)


if __name__ == "__main__":
    unittest.main()
