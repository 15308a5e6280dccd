"""model.download (issue 42, part 4): each model stage's pod gets an init container that downloads
only that stage's files from the Hugging Face Hub, the gateway none. The rendered init container's
own command and environment are run here against a fake Hub (a local `huggingface_hub` module
whose snapshot_download copies from a directory, with the real function's allow_patterns
semantics), on a sharded LLaVA-style and a GLM-4.1V-style checkpoint, and what lands in each
stage's directory is checked against the loader's rules (shared/model/src/checkpoint.rs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import helm_python as helm

from test_chart import INTERNAL, REPO, kube_versions, name_of, objects, render, validate_manifest

DOWNLOAD = {
    "model": {
        "volume": {"emptyDir": {"sizeLimit": "40Gi"}},
        "download": {
            "enabled": True,
            "image": "registry.example.com/tools/hf-download:1.0",
            "repo": "llava-hf/llava-1.5-7b-hf",
            "revision": "0123456789abcdef0123456789abcdef01234567",
            "tokenSecret": {"name": "hf-token", "key": "token"},
        },
    }
}

# snapshot_download(repo_id, revision, allow_patterns, local_dir) over $FAKE_HUB/<repo>@<revision>;
# every call is appended to $FAKE_HUB_LOG. allow_patterns are fnmatch globs, as the real one's.
FAKE_HUB = '''
import fnmatch, json, os, shutil

def snapshot_download(repo_id, revision=None, allow_patterns=None, local_dir=None, **kw):
    root = os.path.join(os.environ["FAKE_HUB"], f"{repo_id}@{revision}")
    if not os.path.isdir(root):
        raise RuntimeError(f"RepositoryNotFound: {repo_id}@{revision}")
    with open(os.environ["FAKE_HUB_LOG"], "a") as log:
        log.write(json.dumps({"repo": repo_id, "revision": revision, "patterns": allow_patterns, "kw": sorted(kw)}) + "\\n")
    for name in sorted(os.listdir(root)):
        if allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns):
            os.makedirs(local_dir, exist_ok=True)
            shutil.copyfile(os.path.join(root, name), os.path.join(local_dir, name))
    return local_dir
'''

COMMON_FILES = {
    "config.json": "{}",
    "preprocessor_config.json": "{}",
    "tokenizer.json": "{}",
    "tokenizer_config.json": "{}",
    "generation_config.json": "{}",
    "chat_template.jinja": "",
    "README.md": "not for any stage",
}

# LLaVA-1.5 as llava-hf ships it (the vision tower split over two shards, the projector next to
# the language model's head), and GLM-4.1V with the merger in a shard of its own.
LLAVA = {
    "language_model.model.embed_tokens.weight": "model-00001-of-00004.safetensors",
    "language_model.model.layers.0.self_attn.q_proj.weight": "model-00001-of-00004.safetensors",
    "language_model.model.layers.1.self_attn.q_proj.weight": "model-00002-of-00004.safetensors",
    "language_model.lm_head.weight": "model-00003-of-00004.safetensors",
    "multi_modal_projector.linear_1.weight": "model-00003-of-00004.safetensors",
    "vision_tower.vision_model.embeddings.patch_embedding.weight": "model-00003-of-00004.safetensors",
    "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": "model-00004-of-00004.safetensors",
}
LLAVA_WANT = {
    "encoder": {"model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"},
    "projector": {"model-00003-of-00004.safetensors"},
    "decoder": {"model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"},
}
GLM4V = {
    "model.visual.patch_embed.proj.weight": "model-00001-of-00003.safetensors",
    "model.visual.blocks.0.attn.qkv.weight": "model-00001-of-00003.safetensors",
    "model.visual.merger.proj.weight": "model-00002-of-00003.safetensors",
    "model.language_model.embed_tokens.weight": "model-00003-of-00003.safetensors",
    "lm_head.weight": "model-00003-of-00003.safetensors",
}
GLM4V_WANT = {
    "encoder": {"model-00001-of-00003.safetensors"},
    "projector": {"model-00002-of-00003.safetensors"},
    "decoder": {"model-00003-of-00003.safetensors"},
}
STAGE_FILES = {
    "encoder": {"config.json", "preprocessor_config.json"},
    "projector": {"config.json"},
    "decoder": {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"},
}


def loader_aliases() -> dict[str, list[tuple[str, list[str], str]]]:
    """PartKind::aliases from shared/model/src/checkpoint.rs: per stage, (logical prefix, physical
    candidates, probe tensor) for both families."""
    source = (REPO / "shared/model/src/checkpoint.rs").read_text()
    body = source[source.index("fn aliases(") :]
    body = body[: body.index("\n    }\n}")]
    arms = re.split(r"\(PartKind::(\w+), (?:true|false|_)\) =>", body)[1:]
    stages = {"Vision": "encoder", "Projector": "projector", "Decoder": "decoder"}
    out: dict[str, list] = {s: [] for s in stages.values()}
    for kind, arm in zip(arms[::2], arms[1::2]):
        for logical, candidates, probe in re.findall(r'\(\s*"([^"]*)",\s*&\[([^\]]*)\],\s*"([^"]*)",\s*(?:true|false),?\s*\)', arm):
            out[stages[kind]].append((logical, re.findall(r'"([^"]*)"', candidates), probe))
    return out


def init_containers(docs: list[dict], component: str) -> list[dict]:
    return objects(docs, "Deployment")[name_of(component)]["spec"]["template"]["spec"].get("initContainers", [])


def plan(container: dict) -> dict[str, list[str]]:
    env = {e["name"]: e.get("value") for e in container["env"]}
    return {k: env[f"VLM_DOWNLOAD_{k.upper()}"].split() for k in ("files", "prefixes", "exclude")}


def stage_tensors(names, p: dict[str, list[str]]) -> set[str]:
    return {n for n in names if n.startswith(tuple(p["prefixes"])) and not n.startswith(tuple(p["exclude"]) or ("\0",))}


class WeightsDownload(unittest.TestCase):
    def test_renders_valid_and_only_in_the_model_stages(self):
        docs = render(DOWNLOAD)
        for version in kube_versions():
            for doc in docs:
                with self.subTest(version=version, kind=doc["kind"], name=doc["metadata"]["name"]):
                    validate_manifest(doc, version)
        self.assertEqual(init_containers(docs, "gateway"), [])
        for component in INTERNAL:
            with self.subTest(component=component):
                (c,) = init_containers(docs, component)
                self.assertEqual(c["name"], "download-weights")
                self.assertEqual(c["image"], DOWNLOAD["model"]["download"]["image"])
                self.assertEqual(c["command"][:2], ["python3", "-c"])
                self.assertEqual(c["command"][2], (REPO / "helm/vlm-mesh/files/download-weights.py").read_text())
                env = {e["name"]: e for e in c["env"]}
                self.assertEqual(env["VLM_DOWNLOAD_REPO"]["value"], "llava-hf/llava-1.5-7b-hf")
                self.assertEqual(env["VLM_DOWNLOAD_REVISION"]["value"], DOWNLOAD["model"]["download"]["revision"])
                self.assertEqual(env["VLM_DOWNLOAD_DIR"]["value"], "/models/llava-1.5-7b-hf")
                self.assertEqual(env["HF_TOKEN"]["valueFrom"]["secretKeyRef"], {"name": "hf-token", "key": "token"})
                # It writes the volume the stage then mounts read-only, and nothing else.
                mounts = {m["name"]: m for m in c["volumeMounts"]}
                self.assertEqual(mounts["model"], {"name": "model", "mountPath": "/models"})
                self.assertTrue(env["HF_HOME"]["value"].startswith("/models/"))
                self.assertIs(c["securityContext"]["readOnlyRootFilesystem"], True)
                self.assertIs(c["securityContext"]["runAsNonRoot"], True)
        # Without a token Secret: anonymous.
        anonymous = {"model": {**DOWNLOAD["model"], "download": {**DOWNLOAD["model"]["download"], "tokenSecret": {"name": "", "key": "token"}}}}
        (c,) = init_containers(render(anonymous), "decoder")
        self.assertNotIn("HF_TOKEN", {e["name"] for e in c["env"]})
        # Off by default.
        for component in INTERNAL:
            self.assertEqual(init_containers(render(None), component), [])

    def test_each_stage_gets_only_its_files(self):
        docs = render(DOWNLOAD)
        plans = {c: plan(init_containers(docs, c)[0]) for c in INTERNAL}
        for component, want in STAGE_FILES.items():
            self.assertLessEqual(want, set(plans[component]["files"]), component)
        self.assertNotIn("tokenizer.json", plans["encoder"]["files"] + plans["projector"]["files"])
        self.assertNotIn("preprocessor_config.json", plans["decoder"]["files"] + plans["projector"]["files"])
        names = list(LLAVA) + list(GLM4V)
        tensors = {c: stage_tensors(names, plans[c]) for c in INTERNAL}
        self.assertEqual(tensors["encoder"], {n for n in names if "vision_tower" in n or (n.startswith("model.visual.") and ".merger." not in n)})
        self.assertEqual(tensors["projector"], {"multi_modal_projector.linear_1.weight", "model.visual.merger.proj.weight"})
        self.assertEqual(tensors["decoder"], {n for n in names if "language_model" in n or n == "lm_head.weight"})

    def test_prefixes_cover_every_name_the_loader_accepts(self):
        """Each physical prefix the loader resolves a stage's tensors under is downloaded for that
        stage, and no other stage's: a renamed prefix in checkpoint.rs fails here."""
        aliases = loader_aliases()
        self.assertEqual(set(aliases), set(INTERNAL))
        plans = {c: plan(init_containers(render(DOWNLOAD), c)[0]) for c in INTERNAL}
        for component, entries in aliases.items():
            self.assertTrue(entries, component)
            for logical, candidates, probe in entries:
                for candidate in candidates:
                    tensor = candidate + probe
                    with self.subTest(component=component, tensor=tensor):
                        owners = [c for c in INTERNAL if stage_tensors([tensor], plans[c])]
                        self.assertEqual(owners, [component])

    def run_init(self, hub: Path, component: str, values=DOWNLOAD, out: Path | None = None) -> tuple[Path, list[dict], subprocess.CompletedProcess]:
        """Runs the rendered init container's command with its environment against the fake Hub
        (in `out`, a fresh directory by default: the pod's model volume)."""
        (c,) = init_containers(render(values), component)
        out = out or Path(tempfile.mkdtemp(dir=hub.parent))
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        env.update(VLM_DOWNLOAD_DIR=str(out / "model"), HF_HOME=str(out / "hf-home"), FAKE_HUB=str(hub), FAKE_HUB_LOG=str(out / "log"),
                   PYTHONPATH=str(hub.parent / "fakelib"), PATH=os.environ["PATH"])
        proc = subprocess.run([sys.executable] + c["command"][1:], env=env, capture_output=True, text=True, timeout=60)
        log = [json.loads(l) for l in (out / "log").read_text().splitlines()] if (out / "log").exists() else []
        return out / "model", log, proc

    def make_hub(self, tmp: Path, repo: str, revision: str, tensors: dict[str, str] | None) -> Path:
        (tmp / "fakelib" / "huggingface_hub").mkdir(parents=True)
        (tmp / "fakelib" / "huggingface_hub" / "__init__.py").write_text(FAKE_HUB)
        root = tmp / "hub" / f"{repo}@{revision}"
        root.mkdir(parents=True)
        for name, text in COMMON_FILES.items():
            (root / name).write_text(text)
        if tensors is None:
            (root / "model.safetensors").write_bytes(b"all")
        else:
            (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": tensors}))
            for shard in set(tensors.values()):
                (root / shard).write_bytes(shard.encode())
        return tmp / "hub"

    def test_the_init_container_downloads_only_the_stage_s_shards(self):
        d = DOWNLOAD["model"]["download"]
        for family, tensors, want in (("llava", LLAVA, LLAVA_WANT), ("glm4v", GLM4V, GLM4V_WANT)):
            with tempfile.TemporaryDirectory() as tmp:
                hub = self.make_hub(Path(tmp), d["repo"], d["revision"], tensors)
                for component in INTERNAL:
                    with self.subTest(family=family, component=component):
                        model, log, proc = self.run_init(hub, component)
                        self.assertEqual(proc.returncode, 0, proc.stderr)
                        got = {p.name for p in model.iterdir() if p.is_file()}
                        shards = {n for n in got if n.endswith(".safetensors")}
                        self.assertEqual(shards, want[component])
                        self.assertEqual(got - shards, STAGE_FILES[component] | {"model.safetensors.index.json"})
                        self.assertTrue(all(call["revision"] == d["revision"] and call["repo"] == d["repo"] for call in log), log)
                        # The index is the Hub's, untouched (the loader maps only the shards of
                        # its part), and the shards downloaded hold every tensor of the stage.
                        index = json.loads((model / "model.safetensors.index.json").read_text())
                        self.assertEqual(set(index["weight_map"]), set(tensors))
                        mine = {n for n, s in tensors.items() if s in want[component]}
                        for name in mine:
                            self.assertTrue((model / index["weight_map"][name]).is_file(), name)
                        # Run again in the same volume (a restarted init container): same result.
                        _, _, again = self.run_init(hub, component, out=model.parent)
                        self.assertEqual(again.returncode, 0, again.stderr)
                        self.assertEqual({p.name for p in model.iterdir() if p.is_file()}, got)
                        self.assertEqual(json.loads((model / "model.safetensors.index.json").read_text()), index)

    def test_one_file_checkpoint_is_downloaded_whole(self):
        d = DOWNLOAD["model"]["download"]
        with tempfile.TemporaryDirectory() as tmp:
            hub = self.make_hub(Path(tmp), d["repo"], d["revision"], None)
            for component in INTERNAL:
                model, _, proc = self.run_init(hub, component)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                got = {p.name for p in model.iterdir() if p.is_file()}
                self.assertEqual(got, STAGE_FILES[component] | {"model.safetensors"}, component)

    def test_failures_are_reported(self):
        d = DOWNLOAD["model"]["download"]
        with tempfile.TemporaryDirectory() as tmp:
            # An index without the stage's tensors (not a VLM checkpoint): the pod does not start.
            hub = self.make_hub(Path(tmp), d["repo"], d["revision"], {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"})
            _, _, proc = self.run_init(hub, "encoder")
            self.assertNotEqual(proc.returncode, 0)
            self.assertIn("no tensor", proc.stderr)
            # A revision the Hub does not have.
            other = {"model": {**DOWNLOAD["model"], "download": {**d, "revision": "v9"}}}
            _, _, proc = self.run_init(hub, "decoder", values=other)
            self.assertNotEqual(proc.returncode, 0)
            self.assertIn("RepositoryNotFound", proc.stderr)

    def test_refusals(self):
        d = DOWNLOAD["model"]["download"]
        for values, message in (
            ({"model": {**DOWNLOAD["model"], "download": {**d, "image": ""}}}, "needs model.download.image"),
            ({"model": {**DOWNLOAD["model"], "download": {**d, "repo": ""}}}, "needs model.download.repo"),
            ({"model": {**DOWNLOAD["model"], "dir": "/data/llava"}}, "must be under model.mountPath"),
            # A PVC is shared by the pods: their init containers would write into one directory.
            ({"model": {"download": d}}, "needs a model.volume of the pod's own"),
        ):
            with self.subTest(message=message):
                with self.assertRaisesRegex(helm.HelmError, re.escape(message)):
                    render(values)
        with self.assertRaises(helm.HelmValuesError):
            render({"model": {"download": {"repo": "not a repo"}}})
        with self.assertRaises(helm.HelmValuesError):
            render({"model": {"download": {"revison": "main"}}})
        # An ephemeral volume is per pod too.
        ephemeral = {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "40Gi"}}}}}
        docs = render({"model": {**DOWNLOAD["model"], "volume": {"ephemeral": ephemeral}}})
        for doc in objects(docs, "Deployment").values():
            validate_manifest(doc, kube_versions()[-1])

    def test_user_init_containers_run_after_the_download(self):
        values = {"model": {**DOWNLOAD["model"], "initContainers": [{"name": "verify", "image": "busybox:1.36", "command": ["true"]}]}}
        docs = render(values)
        for component in INTERNAL:
            self.assertEqual([c["name"] for c in init_containers(docs, component)], ["download-weights", "verify"])
        self.assertEqual(init_containers(docs, "gateway"), [])


if __name__ == "__main__":
    unittest.main()
