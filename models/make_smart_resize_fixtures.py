#!/usr/bin/env python3
"""Writes what transformers' GLM-4.1V `smart_resize` (image_processing_glm4v.py) answers for many
image sizes and settings (issue 22), for vlm-model's own to be checked against
(`shared/model/tests/smart_resize.rs`: equal for every case).

    ~/vlm-venv/bin/python models/make_smart_resize_fixtures.py

Output: models/glm4v/smart_resize.json, a list of {"frames", "height", "width", "temporal_factor",
"factor", "min_pixels", "max_pixels", "resized": [h, w] or "error": message}.
"""
import json
import os
import random

from transformers.models.glm4v.image_processing_glm4v import smart_resize

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "glm4v", "smart_resize.json")
DEFAULT = dict(temporal_factor=2, factor=28, min_pixels=112 * 112, max_pixels=28 * 28 * 15000)


def case(frames, height, width, **settings):
    s = {**DEFAULT, **settings}
    out = {"frames": frames, "height": height, "width": width, **s}
    try:
        out["resized"] = list(smart_resize(num_frames=frames, height=height, width=width, **s))
    except ValueError as e:
        out["error"] = str(e)
    return out


def main():
    rng = random.Random(22)
    cases = []
    # Phone screenshots, documents, photos, tiny and extreme shapes at the processor's defaults.
    for h, w in [(2400, 1080), (1080, 2400), (1920, 1080), (28, 28), (27, 300), (10, 10),
                 (1, 199), (1, 201), (5000, 24), (6000, 8000), (3000, 4000), (112, 112),
                 (56, 56), (29, 57), (41, 1000)]:
        cases.append(case(2, h, w))
    for _ in range(300):
        h, w = rng.randint(1, 9000), rng.randint(1, 9000)
        cases.append(case(2, h, w))
    # Other settings: small max_pixels (downscaling), large min_pixels (upscaling), merge 1.
    for _ in range(100):
        h, w = rng.randint(1, 3000), rng.randint(1, 3000)
        cases.append(case(2, h, w, max_pixels=2 * 28 * 28 * 64))
        cases.append(case(2, h, w, min_pixels=2 * 28 * 28 * 256))
        cases.append(case(2, h, w, factor=14, max_pixels=2 * 14 * 14 * 1024))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(cases, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(cases)} cases to {OUT} ({sum('error' in c for c in cases)} refused)")


if __name__ == "__main__":
    main()
