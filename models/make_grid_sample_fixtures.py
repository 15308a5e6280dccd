#!/usr/bin/env python3
"""Writes torch's bicubic `grid_sample` on random maps and grids (issue 22: GLM-4.1V resamples its
learned position table to every image's patch grid this way), for vlm-model's own implementation
to be checked against (`shared/model/tests/grid_sample.rs`, within 1e-5).

    ~/vlm-venv/bin/python models/make_grid_sample_fixtures.py

Output: models/glm4v/grid_sample.safetensors with, per case k, `input_k` [C, H, W], `grid_k` [N, 2]
(x, y in [-1, 1] normalised coordinates, some outside, as grid_sample takes them) and `output_k`
[N, C] = F.grid_sample(input[None], grid[None, :, None], mode="bicubic", align_corners=False,
padding_mode="border")[0, :, :, 0].T. Cases: random points (inside, on and beyond the border) on
maps of several shapes, and the grids Glm4vVisionEmbeddings builds for patch grids of several
sizes from a square table.
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "glm4v", "grid_sample.safetensors")


def sample(inp, grid):
    out = F.grid_sample(inp[None], grid[None, :, None, :], mode="bicubic", align_corners=False,
                        padding_mode="border")
    return out[0, :, :, 0].T.contiguous()


def glm_grid(h, w):
    """The grid Glm4vVisionEmbeddings.forward builds for an h x w patch grid (row by row)."""
    hs = torch.arange(h).repeat_interleave(w).float()
    ws = torch.arange(w).repeat(h).float()
    return torch.stack(((ws + 0.5) / w * 2 - 1, (hs + 0.5) / h * 2 - 1), dim=-1)


def main():
    g = torch.Generator().manual_seed(22)
    tensors = {}
    cases = []
    for c, h, w, n in [(5, 6, 7, 64), (3, 1, 9, 16), (8, 4, 4, 32), (2, 2, 1, 8)]:
        inp = torch.randn(c, h, w, generator=g)
        grid = torch.rand(n, 2, generator=g) * 3.0 - 1.5  # inside and beyond [-1, 1]
        grid[0] = torch.tensor([-1.0, -1.0])
        grid[1] = torch.tensor([1.0, 1.0])
        cases.append((inp, grid))
    table = torch.randn(16, 6, 6, generator=g)  # a 6x6 position table of width 16
    for h, w in [(4, 6), (10, 4), (6, 6), (1, 3)]:
        cases.append((table, glm_grid(h, w)))
    for k, (inp, grid) in enumerate(cases):
        tensors[f"input_{k}"] = inp.clone()
        tensors[f"grid_{k}"] = grid.clone()
        tensors[f"output_{k}"] = sample(inp, grid)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata={"cases": str(len(cases)), "torch": torch.__version__})
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
