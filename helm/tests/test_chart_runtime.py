"""The rendered pods, run as real processes: each component's container command and environment
exactly as the chart renders them, against the real `vlm-mesh` binary, with real mTLS, probed the
way the kubelet probes them, then asked a question through the gateway.

What differs from a cluster, and only that (kept to what a single host forces):
- listen addresses (gRPC, health, metrics, OpenAI): every pod listens on the same ports, so each
  process gets free loopback ports;
- the Secret mounts: each component's `--ca/--cert/--key` point into its own directory, laid out
  like the Secret (`ca.crt`, `tls.crt`, `tls.key`), filled from `vlm-mesh certs`;
- stage URLs: the gateway dials `https://localhost:<port>` instead of the Service name (no cluster
  DNS here; that the certificates carry the Service names is asserted in test_chart.py);
- `VLM_REDIS` points at the test Redis (VLM_TEST_REDIS_URL) when one is given, else is dropped.

Needs the binary: VLM_MESH_BIN (scripts/test.sh runs this after `cargo test`, which builds it).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import unittest
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from test_chart import COMPONENTS, INTERNAL, REPO, arg, mesh_container, name_of, objects, render

BIN = os.environ.get("VLM_MESH_BIN", "")
MODEL = REPO / "models" / "tiny-llava"
IMAGE = REPO / "models" / "images" / "shapes-48x48.png"
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
STARTUP_S = 180
ORDER = ["encoder", "projector", "decoder", "gateway"]
# Listen addresses the chart renders; each process gets its own loopback port for each.
LISTEN_FLAGS = ["--listen", "--health-listen", "--metrics-listen", "--http-listen"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(port: int, service: str, timeout: float = 2.0) -> str:
    """What the kubelet's gRPC probe does: plaintext grpc.health.v1 Check."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            return f"rpc error {e.code().name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def replace_arg(args: list[str], flag: str, value: str) -> None:
    args[args.index(flag) + 1] = value


def http_get(url: str, ca: Path | None = None, timeout: float = 10.0) -> str:
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:  # loopback only
        return resp.read().decode()


@unittest.skipUnless(BIN or os.environ.get("VLM_HELM_REQUIRE_BIN"), "set VLM_MESH_BIN to the vlm-mesh binary")
class RenderedPodsRun(unittest.TestCase):
    def setUp(self):
        self.assertTrue(BIN and Path(BIN).is_file(), f"VLM_MESH_BIN={BIN!r} is not a file (cargo build first)")
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.procs: dict[str, subprocess.Popen] = {}
        self.addCleanup(self.stop_all)

    def stop_all(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

    def log(self, component: str) -> str:
        return (Path(self.tmp.name) / f"{component}.log").read_text(errors="replace")

    def secrets(self) -> Path:
        """One directory per component in the Secret's layout, from a dev PKI."""
        pki = Path(self.tmp.name) / "pki"
        subprocess.run([BIN, "certs", "--out", str(pki)], check=True, capture_output=True, timeout=60)
        root = Path(self.tmp.name) / "secrets"
        for c in COMPONENTS:
            d = root / c
            d.mkdir(parents=True)
            for src, dst in (("ca.pem", "ca.crt"), (f"{c}.pem", "tls.crt"), (f"{c}.key", "tls.key")):
                (d / dst).write_bytes((pki / src).read_bytes())
                (d / dst).chmod(0o600)
        return root

    def start_pods(self, values: dict) -> dict:
        """Runs every rendered component as a process and waits until its probes pass. Returns
        the rendered Deployments, the Secret directories and the loopback ports, per flag."""
        docs = render(values)
        deployments = objects(docs, "Deployment")
        secrets = self.secrets()
        ports = {flag: {c: free_port() for c in COMPONENTS} for flag in LISTEN_FLAGS}
        base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.tmp.name}
        redis = os.environ.get("VLM_TEST_REDIS_URL")

        for c in ORDER:
            container = mesh_container(deployments[name_of(c)])
            mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tls")
            args = list(container["args"])
            for flag in LISTEN_FLAGS:
                if flag in args:
                    replace_arg(args, flag, f"127.0.0.1:{ports[flag][c]}")
            for flag in ("--ca", "--cert", "--key"):
                path = arg(container, flag)
                self.assertTrue(path.startswith(mount + "/"), (flag, path))
                replace_arg(args, flag, str(secrets / c / path[len(mount) + 1 :]))
            if c == "gateway":
                # The gateway's pod has no model volume: run it where the checkpoint cannot be
                # read, as in the cluster (the directory's name still names the model).
                self.assertNotIn("model", [m["name"] for m in container["volumeMounts"]])
                replace_arg(args, "--model", str(Path(self.tmp.name) / "no-model-volume" / Path(arg(container, "--model")).name))
                for stage in INTERNAL:
                    replace_arg(args, f"--{stage}", f"https://localhost:{ports['--listen'][stage]}")
                # The cache key, from the Secret the chart rendered, where the pod mounts it.
                mounted = next(m for m in container["volumeMounts"] if m["name"] == "cache-secret")
                volume = next(
                    v for v in deployments[name_of(c)]["spec"]["template"]["spec"]["volumes"]
                    if v["name"] == "cache-secret"
                )
                rendered = objects(docs, "Secret")[volume["secret"]["secretName"]]
                (item,) = volume["secret"]["items"]
                local = Path(self.tmp.name) / "cache-secret"
                local.write_bytes(base64.b64decode(rendered["data"][item["key"]]))
                self.assertEqual(arg(container, "--cache-secret-file"), f"{mounted['mountPath']}/{item['path']}")
                replace_arg(args, "--cache-secret-file", str(local))
            env = dict(base_env)
            for e in container.get("env", []):
                if "value" in e:
                    env[e["name"]] = e["value"]
            if "VLM_REDIS" in env:
                if redis:
                    env["VLM_REDIS"] = redis
                else:
                    del env["VLM_REDIS"]
            # Output to a file, not a pipe nobody drains (a full pipe would stall the service).
            with open(Path(self.tmp.name) / f"{c}.log", "w") as out:
                self.procs[c] = subprocess.Popen(
                    [BIN, *args], env=env, stdout=out, stderr=subprocess.STDOUT
                )

        # Readiness, liveness and startup exactly as the Deployment declares them.
        deadline = time.monotonic() + STARTUP_S
        for c in ORDER:
            container = mesh_container(deployments[name_of(c)])
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                service = container[kind]["grpc"].get("service", "")
                while True:
                    status = probe(ports["--health-listen"][c], service)
                    if status == "SERVING":
                        break
                    exited = self.procs[c].poll()
                    if exited is not None:
                        self.fail(f"{c} exited ({exited}): {self.log(c)}")
                    if time.monotonic() > deadline:
                        self.fail(f"{c} {kind} ({service!r}) not SERVING after {STARTUP_S}s: {status}")
                    time.sleep(0.2)  # the kubelet polls too; bounded by the deadline
        return {"deployments": deployments, "secrets": secrets, "ports": ports, "env": base_env}

    def ask(self, pods: dict) -> dict:
        """A real request through the gateway, over TLS verified with the gateway Secret's CA. It
        sets no max_tokens: the chart's decoder.defaultMaxTokens limits it."""
        ask = subprocess.run(
            [BIN, "ask", "--gateway", f"https://localhost:{pods['ports']['--listen']['gateway']}",
             "--ca", str(pods["secrets"] / "gateway" / "ca.crt"), "--image", str(IMAGE),
             "--prompt", PROMPT, "--json", "--timeout", "120"],
            env=pods["env"], capture_output=True, text=True, timeout=180,
        )
        self.assertEqual(ask.returncode, 0, ask.stderr)
        return json.loads(ask.stdout)

    def stop_gracefully(self):
        """SIGTERM (what Kubernetes sends): every stage drains and exits cleanly."""
        for c in reversed(ORDER):
            self.procs[c].send_signal(signal.SIGTERM)
        for c in ORDER:
            try:
                code = self.procs[c].wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.fail(f"{c} did not exit within 60 s of SIGTERM")
            self.assertEqual(code, 0, f"{c}: {self.log(c)}")
            self.assertNotRegex(self.log(c), re.compile(r"panicked", re.I))

    def test_rendered_pods_become_ready_and_answer(self):
        values = {
            "model": {"dir": str(MODEL), "dtype": "f32"},
            "decoder": {"defaultMaxTokens": 6},
            "gateway": {"openai": {"enabled": True}},
        }
        pods = self.start_pods(values)
        deployments, secrets, ports, base_env = pods["deployments"], pods["secrets"], pods["ports"], pods["env"]
        for c in COMPONENTS:
            # What the chart passes, which the binary accepted (it is serving).
            self.assertIn("--metrics-listen", mesh_container(deployments[name_of(c)])["args"], c)
        self.assertIn("--http-listen", mesh_container(deployments[name_of("gateway")])["args"])

        # The chart's decoder.defaultMaxTokens (6) limits the answer.
        answer = self.ask(pods)
        reference = subprocess.run(
            [BIN, "generate", "--model", str(MODEL), "--image", str(IMAGE), "--prompt", PROMPT,
             "--max-tokens", "6", "--json"],
            env=base_env, capture_output=True, text=True, timeout=180,
        )
        self.assertEqual(reference.returncode, 0, reference.stderr)
        self.assertEqual(answer["token_ids"], json.loads(reference.stdout)["token_ids"])
        self.assertEqual(len(answer["token_ids"]), 6)
        self.assertEqual(answer["finish_reason"], "length")
        self.assertRegex(answer["trace_id"], r"^[0-9a-f]{32}$")

        # The stages took their caller roles from the rendered environment (the gateway's calls
        # above were served, so its certificate carries the role they accept).
        for c in INTERNAL:
            self.assertIn("allowed_callers=gateway", self.log(c), c)

        # The internal ports are mTLS: a client without a certificate gets nothing.
        with grpc.insecure_channel(f"127.0.0.1:{ports['--listen']['encoder']}") as channel:
            with self.assertRaises(grpc.RpcError):
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

        # The OpenAI port serves with the gRPC port's TLS (the gateway certificate, the mesh CA)…
        models = json.loads(http_get(
            f"https://localhost:{ports['--http-listen']['gateway']}/v1/models", ca=secrets / "gateway" / "ca.crt"
        ))
        self.assertEqual([m["id"] for m in models["data"]], [MODEL.name])
        # … and not in plaintext.
        with self.assertRaises(Exception):
            http_get(f"http://127.0.0.1:{ports['--http-listen']['gateway']}/v1/models", timeout=5)

        # Every pod's metrics port, scraped as Prometheus would (plain HTTP, the annotated path):
        # each service counted the calls the request above made to it.
        for c in COMPONENTS:
            annotations = deployments[name_of(c)]["spec"]["template"]["metadata"]["annotations"]
            text = http_get(f"http://127.0.0.1:{ports['--metrics-listen'][c]}{annotations['prometheus.io/path']}")
            service = f"vlm.v1.{c.capitalize()}"
            self.assertRegex(
                text, rf'(?m)^vlm_rpc_server_requests_total{{[^}}]*service="{re.escape(service)}"[^}}]*}} [1-9]', c
            )

        self.stop_gracefully()

    def test_default_dtype_and_quantized_stages_load_and_answer(self):
        """The chart's default dtype (f16) with quantized stages, which the chart runs in f32:
        every flag combination it renders is one the binary accepts."""
        values = {
            "model": {"dir": str(MODEL)},
            "encoder": {"quantize": "q8_0"},
            "decoder": {"quantize": "q8_0", "defaultMaxTokens": 6},
        }
        pods = self.start_pods(values)
        dtype = {c: arg(mesh_container(pods["deployments"][name_of(c)]), "--dtype") for c in INTERNAL}
        self.assertEqual(dtype, {"encoder": "f32", "projector": "f16", "decoder": "f32"})
        answer = self.ask(pods)
        self.assertEqual(len(answer["token_ids"]), 6)
        self.assertEqual(answer["finish_reason"], "length")
        for c in ("encoder", "decoder"):
            self.assertIn("quantization=q8_0", self.log(c), c)
        self.stop_gracefully()


if __name__ == "__main__":
    unittest.main()
