#!/usr/bin/env python3
"""Writes models/sampling/reference.json: the distributions transformers samples from, for random
logits and a grid of (temperature, top_k, top_p), which vlm-model's sampler is checked against
(shared/model/tests/sampling_parity.rs).

transformers' `generate(do_sample=True)` warps the logits with TemperatureLogitsWarper, then
TopKLogitsWarper, then TopPLogitsWarper (the order `_get_logits_processor` appends them), takes the
softmax and draws with torch.multinomial. The reference here is that softmax.

    ~/vlm-venv/bin/python models/make_sampling_fixtures.py
"""
import json
import os

import torch
import transformers
from transformers.generation import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampling", "reference.json")


def warpers(temperature, top_k, top_p):
    # The warpers generate builds for these settings (it skips temperature 1, top_k 0, top_p 1).
    w = LogitsProcessorList()
    if temperature != 1.0:
        w.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        w.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        w.append(TopPLogitsWarper(top_p))
    return w


def main():
    g = torch.Generator().manual_seed(20261201)
    cases = []
    vocab = 48
    # (temperature, top_k, top_p, logit scale: from flat to peaked, as a model's are)
    grid = [
        (1.0, 0, 1.0, 2.0),
        (0.7, 0, 1.0, 0.5),
        (1.8, 0, 1.0, 5.0),
        (1.0, 5, 1.0, 2.0),
        (0.5, 12, 1.0, 0.5),
        (1.0, 0, 0.9, 1.0),
        (1.3, 0, 0.5, 2.0),
        (0.8, 0, 0.2, 0.5),
        (1.0, 20, 0.8, 1.0),
        (0.6, 3, 0.95, 0.5),
        (2.5, 30, 0.7, 3.0),
        (1.0, 1, 1.0, 2.0),
        (1.0, 0, 0.6, 8.0),
    ]
    for temperature, top_k, top_p, scale in grid:
        logits = (torch.randn(vocab, generator=g) * scale).to(torch.float32)
        scores = warpers(temperature, top_k, top_p)(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())
        probs = torch.softmax(scores.to(torch.float64), dim=-1)[0]
        cases.append(
            {
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "logits": [float(x) for x in logits],
                "probs": [float(x) for x in probs],
            }
        )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}, f, indent=1)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
