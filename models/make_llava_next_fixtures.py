#!/usr/bin/env python3
"""Writes the tiny random-weight LLaVA-NeXT (anyres) checkpoints and the Hugging Face reference outputs
that vlm-model's LLaVA-NeXT parity tests compare against.

Run it in the same virtualenv as make_tiny_fixtures.py (whose tokenizer, weight randomiser, test
image and constants it imports):

    ~/vlm-venv/bin/pip install "pillow<12.3"   # see below
    ~/vlm-venv/bin/python models/make_llava_next_fixtures.py

Pillow: up to 12.2 its resampler always runs the horizontal pass before the vertical one, and
vlm-model's resampler reproduces that bit for bit. Pillow 12.3 started choosing the pass order by
its own cost estimate, which moves some downscales (e.g. 36x90 -> 24x24) by 1-2 levels; the script
refuses other versions so the references stay reproducible.

It is deterministic: a second run rewrites byte-identical files. Everything it writes is committed;
the Rust tests never need Python.

Outputs
- models/images/next-{tall-36x90,wide-100x40,square-60x60,small-20x14}.png   committed test images
- models/tiny-llava-next/     MHA LLaMA, untied head, gelu projector, layer -2, `default` strategy,
                              pinpoints A = [[24,48],[48,24],[48,48],[24,72],[72,24]]
- models/tiny-llava-next-b/   same CLIP tower; GQA LLaMA (8 heads, 2 kv), tied head, rope 5e5,
                              gelu_pytorch_tanh projector, layer -3, `default` strategy,
                              pinpoints B = [[48,48],[24,96],[96,24],[72,72],[48,96]]
- models/<ckpt>/reference/reference.safetensors   per case <case>.{pixel_values,packed,views_features,
                              input_ids,greedy_ids} and, for region cases, <case>.crop (uint8 HxWx3)
- models/<ckpt>/reference/reference.json          prompt, versions, seed, per-case geometry (image size,
                              best resolution, grid, views, image tokens), greedy ids/text/margin, and a
                              "grids" summary of the grid each image gets under pinpoints A and B

Every pinpoint is [height, width]. The vision tower sees 24x24 tiles of 4x4 = 16 patches (patch 6).
Region cases crop the image to a box given in relative 0..1000 coordinates (left/top floored,
right/bottom ceiled) and process the crop as its own image.
"""
import json
import os
import shutil
import sys

import numpy as np
import PIL

if tuple(int(x) for x in PIL.__version__.split(".")[:2]) >= (12, 3):
    raise SystemExit(f"Pillow {PIL.__version__}: install pillow<12.3 (see the module docstring)")
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tiny_fixtures as base  # noqa: E402  (make_tokenizer, randomise, test_image, CLIP_MEAN, ...)

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)
from transformers.image_processing_utils import select_best_resolution  # noqa: E402

MODELS = base.MODELS
IMAGES = base.IMAGES
NEW_TOKENS = 8
MIN_MARGIN = base.MIN_MARGIN
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    image_size=24, patch_size=6, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16,
)
PINPOINTS_A = [[24, 48], [48, 24], [48, 48], [24, 72], [72, 24]]
PINPOINTS_B = [[48, 48], [24, 96], [96, 24], [72, 72], [48, 96]]

# (case name, file name, width, height, noise seed)
IMAGE_SPECS = [
    ("tall", "next-tall-36x90.png", 36, 90, 21),
    ("wide", "next-wide-100x40.png", 100, 40, 22),
    ("square", "next-square-60x60.png", 60, 60, 23),
    ("small", "next-small-20x14.png", 20, 14, 24),  # smaller than one 24x24 tile
]
# (case name, source image case, box x0,y0,x1,y1 in 0..1000)
REGIONS = [
    ("tall_roi_a", "tall", (100, 200, 700, 900)),
    ("tall_roi_b", "tall", (0, 0, 1000, 333)),
    ("wide_roi_a", "wide", (250, 0, 750, 1000)),
    ("wide_roi_b", "wide", (10, 20, 510, 980)),
    ("square_roi_tiny", "square", (400, 400, 520, 520)),
]


def pixel_box(region, width, height):
    """Relative 0..1000 box -> PIL crop box: left/top floored, right/bottom ceiled (integer arithmetic)."""
    x0, y0, x1, y1 = region
    return (x0 * width // 1000, y0 * height // 1000, -(-x1 * width // 1000), -(-y1 * height // 1000))


def write_images():
    """Writes the test images, then re-opens them from disk so cases use exactly the committed pixels."""
    os.makedirs(IMAGES, exist_ok=True)
    images = {}
    for case, fname, w, h, seed in IMAGE_SPECS:
        path = os.path.join(IMAGES, fname)
        base.test_image(w, h, seed=seed).save(path)
        img = Image.open(path)
        img.load()
        images[case] = img
    return images


def make_cases(images):
    cases = []
    for case, _, _, _, _ in IMAGE_SPECS:
        img = images[case]
        cases.append(dict(name=case, image=img, path=img.filename, region=None, box=None, pil=img))
    for case, src, region in REGIONS:
        img = images[src]
        box = pixel_box(region, img.width, img.height)
        crop = img.crop(box)
        cases.append(dict(name=case, image=img, path=img.filename, region=list(region), box=list(box), pil=crop))
    return cases


def grid_for(size_hw, pinpoints, tile):
    best = select_best_resolution(list(size_hw), pinpoints)
    return [int(best[0]), int(best[1])], [best[0] // tile, best[1] // tile]


def grids_summary(images, this):
    tile = VISION["image_size"]
    out = {"this": this, "pinpoints": {"A": PINPOINTS_A, "B": PINPOINTS_B}, "images": {}, "differ": []}
    for case, fname, _, _, _ in IMAGE_SPECS:
        img = images[case]
        hw = [img.height, img.width]
        entry = {"image": f"../images/{fname}", "image_size": hw}
        for key, pins in (("A", PINPOINTS_A), ("B", PINPOINTS_B)):
            best, grid = grid_for(hw, pins, tile)
            entry[key] = {"best_resolution": best, "grid": grid}
        if entry["A"]["grid"] != entry["B"]["grid"]:
            out["differ"].append(case)
        out["images"][case] = entry
    return out


def build(name, text, llava_kwargs, pinpoints, cases, seed):
    """One seed: returns (model, processor, tokenizer, results) or None when the greedy path is too close
    to a tie (or stops early) in any case."""
    hf_tok = base.make_tokenizer(None)
    image_token_id = hf_tok.convert_tokens_to_ids("<image>")
    text = dict(text)
    text.update(
        vocab_size=len(hf_tok),
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(**text),
        image_token_index=image_token_id,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=text["tie_word_embeddings"],
        **llava_kwargs,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    before = model.model.image_newline.detach().clone()
    base.randomise(model, seed)  # image_newline is a 1-D non-norm parameter: randn
    assert not torch.equal(before, model.model.image_newline), "image_newline was not randomised"
    assert float(model.model.image_newline.detach().abs().mean()) > 0.3, "image_newline should be O(1) randn"
    model.generation_config.pad_token_id = hf_tok.pad_token_id

    tile = VISION["image_size"]
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        do_center_crop=True,
        image_mean=base.CLIP_MEAN,
        image_std=base.CLIP_STD,
        resample=3,
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=hf_tok,
        patch_size=VISION["patch_size"],
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )

    results = []
    layer = cfg.vision_feature_layer
    for case in cases:
        inputs = processor(text=PROMPT, images=case["pil"], return_tensors="pt")
        pv = inputs["pixel_values"]
        sizes = inputs["image_sizes"]
        ids = inputs["input_ids"]
        assert pv.dim() == 5 and pv.shape[0] == 1, pv.shape
        hw = [int(v) for v in sizes[0].tolist()]
        assert hw == [case["pil"].height, case["pil"].width], (hw, case["pil"].size)
        best, grid = grid_for(hw, pinpoints, tile)
        num_views = pv.shape[1]
        assert num_views == grid[0] * grid[1] + 1, (case["name"], num_views, grid)
        num_image_tokens = int((ids == image_token_id).sum())
        with torch.no_grad():
            img_out = model.model.get_image_features(
                pixel_values=pv,
                image_sizes=sizes,
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            )
            pooled = img_out.pooler_output
            assert isinstance(pooled, (list, tuple)) and len(pooled) == 1, type(pooled)
            packed = pooled[0]
            assert packed.shape == (num_image_tokens, cfg.text_config.hidden_size), (packed.shape, num_image_tokens)

            vt = model.model.vision_tower(pv[0], output_hidden_states=True)
            feats = vt.hidden_states[layer][:, 1:]
            views = model.model.multi_modal_projector(feats)
            n_patch = (tile // VISION["patch_size"]) ** 2
            assert views.shape == (num_views, n_patch, cfg.text_config.hidden_size)
            assert torch.equal(packed[:n_patch], views[0]), "packed features must start with the base view"

            gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            new_ids = gen[0, ids.shape[1]:]
            if new_ids.shape[0] != NEW_TOKENS:
                print(f"  {name} seed {seed}: {case['name']} stopped early ({new_ids.tolist()})")
                return None
            full = model(
                input_ids=gen[:, :-1], pixel_values=pv, image_sizes=sizes, attention_mask=torch.ones_like(gen[:, :-1])
            ).logits[0, ids.shape[1] - 1:]
            assert torch.equal(full.argmax(-1), new_ids), "greedy path differs from the full forward's argmax"
            top2 = full.topk(2, dim=-1).values
            margin = float((top2[:, 0] - top2[:, 1]).min())
        if margin < MIN_MARGIN:
            print(f"  {name} seed {seed}: {case['name']} margin {margin:.5f} < {MIN_MARGIN}")
            return None
        res = dict(
            name=case["name"],
            image=os.path.relpath(case["path"], os.path.join(MODELS, name)),
            region=case["region"],
            pixel_box=case["box"],
            image_size=hw,
            best_resolution=best,
            grid=grid,
            num_views=int(num_views),
            num_image_tokens=num_image_tokens,
            greedy_ids=new_ids.tolist(),
            greedy_text=hf_tok.decode(new_ids, skip_special_tokens=True),
            min_greedy_margin=margin,
        )
        tensors = {
            "pixel_values": pv[0].to(torch.float32).contiguous(),
            "packed": packed.contiguous(),
            "views_features": views.contiguous(),
            "input_ids": ids[0].to(torch.int64).contiguous(),
            "greedy_ids": new_ids.to(torch.int64).contiguous(),
        }
        if case["region"] is not None:
            tensors["crop"] = torch.from_numpy(np.array(case["pil"].convert("RGB"), dtype=np.uint8)).contiguous()
        results.append((res, tensors))
    return model, processor, hf_tok, results


def write_checkpoint(name, text, llava_kwargs, pinpoints, images, seed):
    cases = make_cases(images)
    for s in range(seed, seed + 50):
        built = build(name, text, llava_kwargs, pinpoints, cases, s)
        if built is not None:
            break
    else:
        raise SystemExit(f"{name}: no seed in [{seed}, {seed + 50}) gives a greedy margin >= {MIN_MARGIN}")
    model, processor, _, results = built

    out_dir = os.path.join(MODELS, name)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)  # generated content only: no stale shards or references survive a rerun
    ref_dir = os.path.join(out_dir, "reference")
    os.makedirs(ref_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)

    flat = {}
    for res, tensors in results:
        for key, t in tensors.items():
            flat[f"{res['name']}.{key}"] = t
    save_file(flat, os.path.join(ref_dir, "reference.safetensors"))
    this = "A" if pinpoints == PINPOINTS_A else "B"
    with open(os.path.join(ref_dir, "reference.json"), "w") as f:
        json.dump(
            {
                "prompt": PROMPT,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "pillow": PIL.__version__,
                "seed": s,
                "cases": [res for res, _ in results],
                "grids": grids_summary(images, this),
            },
            f,
            indent=2,
        )
        f.write("\n")

    print(f"{name}: seed={s} min margin={min(r['min_greedy_margin'] for r, _ in results):.4f}")
    for r, _ in results:
        print(
            f"  {r['name']:16s} size={r['image_size']} best={r['best_resolution']} grid={r['grid']}"
            f" views={r['num_views']} tokens={r['num_image_tokens']} margin={r['min_greedy_margin']:.4f}"
        )


def main():
    images = write_images()
    summary = grids_summary(images, "A")
    assert summary["differ"], "pinpoint sets A and B must give a different grid for at least one image"
    assert "square" in summary["differ"], summary["images"]["square"]
    write_checkpoint(
        "tiny-llava-next",
        text=dict(
            hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
        llava_kwargs=dict(
            projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        ),
        pinpoints=PINPOINTS_A,
        images=images,
        seed=31,
    )
    write_checkpoint(
        "tiny-llava-next-b",
        text=dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
        llava_kwargs=dict(
            projector_hidden_act="gelu_pytorch_tanh", vision_feature_layer=-3,
            vision_feature_select_strategy="default",
        ),
        pinpoints=PINPOINTS_B,
        images=images,
        seed=41,
    )
    print("grids differing between pinpoints A and B:", summary["differ"])


if __name__ == "__main__":
    sys.exit(main())
