# Downloads one stage's part of a Hugging Face checkpoint into the pod's model volume: the init
# container model.download renders runs it as `python3 -c` in every encoder, projector and
# decoder pod (helm/tests/test_weights_download.py runs it against a fake Hub).
#
# The files a stage reads come by name (VLM_DOWNLOAD_FILES: config, processor or tokenizer
# files; names the repository lacks are skipped). Which safetensors shards hold a stage's tensors
# cannot be known before the checkpoint's index is read, so the index comes first and then only
# the shards holding a tensor whose name starts with one of VLM_DOWNLOAD_PREFIXES (and with none
# of VLM_DOWNLOAD_EXCLUDE). The index is kept as it is: the services map only the shards of their
# own part and refuse a missing one only when it holds one of their tensors ("shard ... (it holds
# ... tensors) is missing"). A checkpoint in one model.safetensors holds every stage's tensors: it
# is downloaded whole.
import json
import os
import sys

from huggingface_hub import snapshot_download

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

repo = os.environ["VLM_DOWNLOAD_REPO"]
revision = os.environ["VLM_DOWNLOAD_REVISION"]
dest = os.environ["VLM_DOWNLOAD_DIR"]
stage = os.environ.get("VLM_DOWNLOAD_STAGE", "stage")
files = os.environ["VLM_DOWNLOAD_FILES"].split()
prefixes = tuple(os.environ["VLM_DOWNLOAD_PREFIXES"].split())
exclude = tuple(os.environ.get("VLM_DOWNLOAD_EXCLUDE", "").split())


def fetch(patterns):
    print(f"{stage}: downloading {repo}@{revision}: {' '.join(patterns)}", flush=True)
    snapshot_download(repo_id=repo, revision=revision, allow_patterns=list(patterns), local_dir=dest)


def mine(name):
    return name.startswith(prefixes) and not (exclude and name.startswith(exclude))


fetch(files + [INDEX])
index_path = os.path.join(dest, INDEX)
if not os.path.exists(index_path):
    fetch([SINGLE])
    if not os.path.exists(os.path.join(dest, SINGLE)):
        sys.exit(f"{stage}: {repo}@{revision} has neither {INDEX} nor {SINGLE}")
    print(f"{stage}: {SINGLE} holds every stage's tensors: downloaded whole", flush=True)
    sys.exit(0)

with open(index_path) as f:
    index = json.load(f)
weight_map = index["weight_map"]
shards = sorted({shard for name, shard in weight_map.items() if mine(name)})
if not shards:
    sys.exit(
        f"{stage}: no tensor in {repo}@{revision}/{INDEX} starts with one of {' '.join(prefixes)}"
        " (is this a LLaVA, LLaVA-NeXT or GLM-4.1V checkpoint?)"
    )
fetch(shards)
missing = [s for s in shards if not os.path.exists(os.path.join(dest, s))]
if missing:
    sys.exit(f"{stage}: shards not downloaded: {' '.join(missing)}")
total = len(set(weight_map.values()))
print(f"{stage}: {len(shards)} of {total} shards ({' '.join(shards)})", flush=True)
