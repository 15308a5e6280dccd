#!/usr/bin/env python3
"""Ours vs Hugging Face transformers on CPU, interleaved in one run: prefill time (image encoder,
projector and prompt prefill, up to the first token's logits) and decode tokens/s, same checkpoint,
same thread count, greedy, same prompt and image.

    ~/vlm-venv/bin/python scripts/bench_transformers.py --model target/bench-models/small \
        --exe target/debug/vlm-mesh --rounds 5 --max-tokens 32

Ours runs as `vlm-mesh generate --json` (its reported encode+project+prefill and decode times, so
process start and model load are not counted); transformers runs in this process. Prints a table,
and one JSON object with --json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"


def ours(exe, model, image, max_tokens):
    out = subprocess.run(
        [exe, "generate", "--json", "--model", model, "--image", image, "--prompt", PROMPT,
         "--max-tokens", str(max_tokens), "--temperature", "0"],
        check=True, capture_output=True, text=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    t = r["timings"]
    n = len(r["token_ids"])
    # decode_ms covers sampling all n tokens and n-1 forward passes (the last token is not run).
    return t["encode_ms"] + t["project_ms"] + t["prefill_ms"], (n - 1) / (t["decode_ms"] / 1e3), r["token_ids"]


def theirs(model, inputs, max_tokens):
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(**inputs, use_cache=True)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = [int(tok)]
        mask = inputs["attention_mask"]
        t0 = time.perf_counter()
        for _ in range(max_tokens - 1):
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            out = model(input_ids=tok, attention_mask=mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            ids.append(int(tok))
        decode_s = time.perf_counter() - t0
    return prefill_ms, (max_tokens - 1) / decode_s, ids


def spread(xs):
    xs = sorted(xs)
    return {"p50": statistics.median(xs), "min": xs[0], "max": xs[-1]}


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--exe", default=os.path.join(root, "target", "debug", "vlm-mesh"))
    ap.add_argument("--image", default=os.path.join(root, "models", "images", "shapes-48x48.png"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    env_threads = str(a.threads)
    os.environ["RAYON_NUM_THREADS"] = env_threads  # candle's CPU kernels
    model = LlavaForConditionalGeneration.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(a.model)
    inputs = proc(text=PROMPT, images=Image.open(a.image).convert("RGB"), return_tensors="pt")
    # Warm-up both.
    theirs(model, inputs, 2)
    ours(a.exe, a.model, a.image, 2)
    rows = {"ours_prefill_ms": [], "theirs_prefill_ms": [], "ours_tok_s": [], "theirs_tok_s": []}
    for r in range(a.rounds):
        for side in ([0, 1] if r % 2 == 0 else [1, 0]):
            if side == 0:
                p, tps, ids_ours = ours(a.exe, a.model, a.image, a.max_tokens)
                rows["ours_prefill_ms"].append(p)
                rows["ours_tok_s"].append(tps)
            else:
                p, tps, ids_theirs = theirs(model, inputs, a.max_tokens)
                rows["theirs_prefill_ms"].append(p)
                rows["theirs_tok_s"].append(tps)
    report = {k: spread(v) for k, v in rows.items()}
    report.update(
        threads=a.threads, rounds=a.rounds, max_tokens=a.max_tokens, model=a.model,
        torch=torch.__version__, same_tokens=ids_ours == ids_theirs,
        prefill_ratio=report["ours_prefill_ms"]["p50"] / report["theirs_prefill_ms"]["p50"],
        decode_ratio=report["ours_tok_s"]["p50"] / report["theirs_tok_s"]["p50"],
    )
    if a.json:
        print(json.dumps(report))
    else:
        for k in rows:
            s = report[k]
            print(f"{k:<20} p50 {s['p50']:9.2f}  min {s['min']:9.2f}  max {s['max']:9.2f}")
        print(f"prefill time, ours / transformers: {report['prefill_ratio']:.3f}  (lower is better)")
        print(f"decode tokens/s, ours / transformers: {report['decode_ratio']:.3f}  (higher is better)")
        print(f"same greedy tokens: {report['same_tokens']}; threads {a.threads}; torch {torch.__version__}")


if __name__ == "__main__":
    sys.exit(main())
