"""The optional KEDA ScaledObjects (`<stage>.autoscaling.keda`): one per enabled stage, valid
against KEDA's CRD (cloudcoil.models.keda), scaling the stage's Deployment on a Prometheus query
of a metric the services export, with no chart HPA beside it."""

from __future__ import annotations

import copy
import re
import unittest

import helm_python as helm

from test_chart import (
    INTERNAL,
    NAMESPACE,
    REPO,
    kube_versions,
    name_of,
    objects,
    render,
    validate_manifest,
)

KEDA_ON = {"enabled": True, "serverAddress": "http://prom.monitoring:9090", "target": 0.6}


def exported_metrics() -> set[str]:
    """Every metric family the services register (shared/telemetry's MeshMetrics)."""
    source = (REPO / "shared/telemetry/src/metrics/mod.rs").read_text()
    return set(re.findall(r'registered\(r, "(vlm_[a-z_]+)"', source))


class Keda(unittest.TestCase):
    def test_off_by_default(self):
        docs = render(None)
        self.assertEqual(objects(docs, "ScaledObject"), {})
        self.assertEqual(len(objects(docs, "HorizontalPodAutoscaler")), 4)

    def test_one_scaled_object_per_enabled_stage(self):
        values = {s: {"autoscaling": {"keda": KEDA_ON, "minReplicas": 2, "maxReplicas": 9}} for s in INTERNAL}
        docs = render(values)
        scaled = objects(docs, "ScaledObject")
        self.assertEqual(set(scaled), {name_of(s) for s in INTERNAL})
        for version in kube_versions():
            for doc in docs:
                with self.subTest(version=version, kind=doc["kind"], name=doc["metadata"]["name"]):
                    validate_manifest(doc, version)
        # KEDA makes the HPA of those stages; the gateway keeps the chart's.
        self.assertEqual(set(objects(docs, "HorizontalPodAutoscaler")), {name_of("gateway")})
        deployments = objects(docs, "Deployment")
        metrics = exported_metrics()
        self.assertIn("vlm_saturation", metrics)
        for stage in INTERNAL:
            so = scaled[name_of(stage)]
            self.assertEqual(so["spec"]["scaleTargetRef"]["name"], name_of(stage))
            self.assertIn(name_of(stage), deployments)
            self.assertNotIn("replicas", deployments[name_of(stage)]["spec"], "KEDA owns the count")
            self.assertEqual((so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]), (2, 9))
            (trigger,) = so["spec"]["triggers"]
            self.assertEqual((trigger["type"], trigger["metricType"]), ("prometheus", "AverageValue"))
            meta = trigger["metadata"]
            self.assertEqual(meta["serverAddress"], "http://prom.monitoring:9090")
            self.assertEqual(meta["threshold"], "0.6")
            query = meta["query"]
            named = set(re.findall(r"\b(vlm_[a-z_]+)\b", query))
            self.assertTrue(named and named <= metrics, f"{query} names {named - metrics}")
            # Only this stage's pods, in the release's namespace.
            self.assertIn(f'namespace="{NAMESPACE}"', query)
            pods = re.search(r'pod=~"([^"]+)"', query).group(1)
            self.assertTrue(re.fullmatch(pods, f"{name_of(stage)}-5d9f7c6b8-x2x7q"), query)
            others = [s for s in INTERNAL if s != stage]
            self.assertFalse(any(re.fullmatch(pods, f"{name_of(s)}-5d9f7c6b8-x2x7q") for s in others), query)

    def test_one_stage_alone(self):
        docs = render({"decoder": {"autoscaling": {"keda": {"enabled": True}}}})
        self.assertEqual(set(objects(docs, "ScaledObject")), {name_of("decoder")})
        hpas = set(objects(docs, "HorizontalPodAutoscaler"))
        self.assertEqual(hpas, {name_of(s) for s in ["gateway", "encoder", "projector"]})

    def test_the_validator_catches_a_wrong_field(self):
        docs = render({"encoder": {"autoscaling": {"keda": {"enabled": True}}}})
        so = copy.deepcopy(objects(docs, "ScaledObject")[name_of("encoder")])
        so["spec"]["minReplicas"] = so["spec"].pop("minReplicaCount")
        with self.assertRaises(ValueError):
            validate_manifest(so, kube_versions()[-1])

    def test_the_gateway_is_refused(self):
        with self.assertRaisesRegex(helm.HelmError, "gateway.autoscaling.keda"):
            render({"gateway": {"autoscaling": {"keda": {"enabled": True}}}})
