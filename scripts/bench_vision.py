#!/usr/bin/env python3
"""transformers' side of `vlm-mesh bench realsize`'s vision encode: a LLaVA checkpoint's CLIP
vision tower and projector (what `LlavaForConditionalGeneration.get_image_features` runs), loaded
alone from the checkpoint's safetensors (not the language model), on random pixels of the tower's
input size.

    PY scripts/bench_vision.py --model DIR --threads 2 --serve

Prints {"ready": true, "torch": VERSION, "features": [N, D]} once loaded, then for every line read
from stdin runs one encode (tower + feature selection + projector) and prints {"ms": TIME}.
"""
import argparse
import json
import os
import sys
import time


def load(model_dir):
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, CLIPVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type != "llava":
        sys.exit(f"bench_vision.py times LLaVA (CLIP) towers; {model_dir} is {cfg.model_type}")
    tower = CLIPVisionModel(cfg.vision_config)
    proj = LlavaMultiModalProjector(cfg)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    t_sd, p_sd = {}, {}
    for f in files:
        with safe_open(os.path.join(model_dir, f), "pt") as st:
            for k in st.keys():
                if "vision_tower." in k:
                    t_sd[k.split("vision_tower.", 1)[1]] = st.get_tensor(k).float()
                elif "multi_modal_projector." in k:
                    p_sd[k.split("multi_modal_projector.", 1)[1]] = st.get_tensor(k).float()
    missing = tower.load_state_dict(t_sd, strict=False)
    if missing.missing_keys:
        sys.exit(f"vision tower weights missing from the checkpoint: {missing.missing_keys[:5]}")
    proj.load_state_dict(p_sd)
    return cfg, tower.eval(), proj.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--serve", action="store_true")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    cfg, tower, proj = load(a.model)
    size = cfg.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, size, size, generator=g)
    layer = cfg.vision_feature_layer
    drop_cls = cfg.vision_feature_select_strategy == "default"

    def encode():
        with torch.inference_mode():
            hs = tower(pixels, output_hidden_states=True).hidden_states[layer]
            if drop_cls:
                hs = hs[:, 1:]
            return proj(hs)

    feats = encode()
    print(json.dumps({"ready": True, "torch": torch.__version__, "features": list(feats.shape[1:])}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        t0 = time.perf_counter()
        encode()
        print(json.dumps({"ms": (time.perf_counter() - t0) * 1e3}), flush=True)


if __name__ == "__main__":
    main()
