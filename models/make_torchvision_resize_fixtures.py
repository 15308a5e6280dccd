#!/usr/bin/env python3
"""Writes torchvision's `resize(uint8, BICUBIC | BILINEAR, antialias=True)` on random RGB images (issue 22:
transformers' default GLM-4.1V image processor is torchvision-backed and resizes this way), for
`vlm_model::resize::resize_torchvision` to be checked against bit for bit
(`shared/model/tests/torchvision_resize.rs`).

    ~/vlm-venv/bin/python models/make_torchvision_resize_fixtures.py

Output: models/glm4v/torchvision_resize.safetensors with `input_k` [H, W, 3], `output_k` (bicubic)
and `bilinear_output_k` [h, w, 3] (uint8) per case: down- and upscaling, each axis alone, both, and a 4x downscale.
"""
import os

import torch
import torchvision
import torchvision.transforms.v2.functional as tvF
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "glm4v", "torchvision_resize.safetensors")
CASES = [  # (input h, w) -> (output h, w)
    ((53, 37), (28, 56)), ((60, 100), (56, 112)), ((100, 150), (112, 168)), ((90, 20), (112, 28)),
    ((40, 40), (84, 84)), ((33, 70), (56, 84)), ((120, 160), (28, 56)), ((20, 30), (84, 112)),
    ((40, 50), (84, 50)), ((28, 90), (28, 28)),
]


def main():
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for k, ((h, w), (oh, ow)) in enumerate(CASES):
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        out = tvF.resize(img, [oh, ow], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        tensors[f"input_{k}"] = img.permute(1, 2, 0).contiguous()
        tensors[f"output_{k}"] = out.permute(1, 2, 0).contiguous()
        # BILINEAR, which an image processor's `resample: 2` asks for.
        lin = tvF.resize(img, [oh, ow], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)
        tensors[f"bilinear_output_{k}"] = lin.permute(1, 2, 0).contiguous()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata={"torch": torch.__version__, "torchvision": torchvision.__version__})
    print(f"wrote {len(CASES)} cases to {OUT}")


if __name__ == "__main__":
    main()
