#!/usr/bin/env python3
"""Writes what ships next to the trained `models/shapes-llava` checkpoint (run after train.py):

- samples/*.png + samples/samples.json   a few scenes the model describes correctly; demo.png is the
                                         image `vlm-mesh demo` asks about
- heldout/                               a small held-out evaluation set (images + questions.jsonl)
                                         that tests/shapes_mesh.rs evaluates through the mesh
- reference/greedy.json                  transformers' greedy answers (token ids) for every question
                                         about the first 20 held-out images: the parity fixture of
                                         shared/model/tests/shapes_parity.rs

    ~/vlm-venv/bin/python models/shapes/make_fixtures.py
    ~/vlm-venv/bin/python models/shapes/make_fixtures.py --eval /tmp/fresh   # transformers' accuracy on a set

Held-out scenes come from seeds the training script never uses.
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image

import transformers
from transformers import LlavaForConditionalGeneration, LlavaProcessor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "shapes-llava")
HELDOUT_SEED = 20261110
SAMPLES_SEED = 777
HELDOUT_IMAGES = 20
HELDOUT_KINDS = ["colour", "shape", "position", "describe"]
MAX_NEW_TOKENS = 16


def load(model_dir):
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(model_dir)
    return model, processor


@torch.no_grad()
def answer(model, processor, image, question):
    """Greedy answer: (text, new token ids incl. EOS, smallest top-1/top-2 logit gap on the path)."""
    inputs = processor(text=dataset.prompt(question), images=image, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    gen = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new = gen[0, n:]
    logits = model(input_ids=gen[:, :-1], pixel_values=inputs["pixel_values"]).logits[0, n - 1:]
    top2 = logits.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    text = processor.tokenizer.decode(new, skip_special_tokens=True)
    return text, new.tolist(), margin


def norm(s):
    return " ".join(w.strip(".,!?").lower() for w in s.split())


def evaluate(model, processor, set_dir):
    rows = [json.loads(l) for l in open(os.path.join(set_dir, "questions.jsonl")) if l.strip()]
    per, out = {}, []
    t = time.time()
    for r in rows:
        img = Image.open(os.path.join(set_dir, r["image"]))
        text, ids, margin = answer(model, processor, img, r["question"])
        ok = norm(text) == norm(r["answer"])
        hit, total = per.get(r["kind"], (0, 0))
        per[r["kind"]] = (hit + ok, total + 1)
        out.append(dict(r, got=text.strip(), token_ids=ids, correct=ok, margin=margin))
    return per, out, time.time() - t


def write_samples(model, processor, out_dir):
    """Sample scenes the model gets entirely right, the first two-shape one becoming demo.png."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    rng = np.random.default_rng(SAMPLES_SEED)
    meta, want = [], {1: 2, 2: 3}
    while sum(want.values()):
        scene, img = dataset.make_scene(rng)
        n = len(scene["objects"])
        if not want[n]:
            continue
        qa = [dataset.question(scene, "describe", rng)] + [
            (f"Where is the {o['shape']}?", o["position"]) for o in scene["objects"]
        ]
        got = [answer(model, processor, img, q)[0].strip() for q, _ in qa]
        if any(norm(g) != norm(a) for g, (_, a) in zip(got, qa)):
            continue
        name = "demo.png" if n == 2 and want[2] == 3 else f"sample-{len(meta)}.png"
        img.save(os.path.join(out_dir, name))
        want[n] -= 1
        meta.append({
            "image": name,
            "description": dataset.describe(scene),
            "objects": [{k: o[k] for k in ("shape", "colour", "position")} for o in scene["objects"]],
            "background": "noisy" if scene["noisy"] else "plain",
        })
    meta.sort(key=lambda m: m["image"])
    with open(os.path.join(out_dir, "samples.json"), "w") as f:
        json.dump({"prompt": dataset.prompt("Describe the image."), "samples": meta}, f, indent=2)
        f.write("\n")
    return meta


def write_reference(model, processor, heldout_dir, ref_dir):
    rows = [json.loads(l) for l in open(os.path.join(heldout_dir, "questions.jsonl")) if l.strip()]
    images = sorted({r["image"] for r in rows})[:20]
    cases = []
    for r in rows:
        if r["image"] not in images:
            continue
        img = Image.open(os.path.join(heldout_dir, r["image"]))
        text, ids, margin = answer(model, processor, img, r["question"])
        cases.append({
            "image": os.path.relpath(os.path.join(heldout_dir, r["image"]), MODEL),
            "prompt": dataset.prompt(r["question"]),
            "greedy_ids": ids,
            "greedy_text": text,
            "min_greedy_margin": round(margin, 4),
        })
    os.makedirs(ref_dir, exist_ok=True)
    with open(os.path.join(ref_dir, "greedy.json"), "w") as f:
        json.dump(
            {
                "max_new_tokens": MAX_NEW_TOKENS,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "cases": cases,
            },
            f,
            indent=1,
        )
        f.write("\n")
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--eval", metavar="SET", help="only report transformers' accuracy on SET (writes SET/transformers.jsonl)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, processor = load(args.model)

    if args.eval:
        per, out, secs = evaluate(model, processor, args.eval)
        with open(os.path.join(args.eval, "transformers.jsonl"), "w") as f:
            for r in out:
                f.write(json.dumps(r) + "\n")
        for k, (h, t) in sorted(per.items()):
            print(f"{k:<10} {h:>5}/{t:<5} {100 * h / t:.1f}%")
        print(f"{len(out)} questions in {secs:.0f}s; smallest greedy margin {min(r['margin'] for r in out):.3f}")
        return

    samples = write_samples(model, processor, os.path.join(MODEL, "samples"))
    print("samples:", [(s["image"], s["description"]) for s in samples])

    heldout = os.path.join(MODEL, "heldout")
    if os.path.isdir(heldout):
        shutil.rmtree(heldout)
    dataset.write_set(heldout, HELDOUT_IMAGES, HELDOUT_SEED, HELDOUT_KINDS)
    per, out, _ = evaluate(model, processor, heldout)
    print("held-out (transformers):", {k: f"{h}/{t}" for k, (h, t) in sorted(per.items())})
    for r in out:
        if not r["correct"]:
            print("  wrong:", r["image"], r["question"], "expected", r["answer"], "got", r["got"])

    cases = write_reference(model, processor, heldout, os.path.join(MODEL, "reference"))
    print(f"reference: {len(cases)} greedy answers, smallest margin {min(c['min_greedy_margin'] for c in cases)}")


if __name__ == "__main__":
    main()
