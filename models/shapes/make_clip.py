#!/usr/bin/env python3
"""A synthetic "live" clip for frame streams: one shape moving across a still background.

The shape rests at the centre of a grid cell for --still frames (byte-identical PNGs, so change
detection can skip them), then moves in a straight line to the next cell centre over --moving
frames. Cells are visited in a snake order and then back the same way, so every move is to a
neighbouring cell:

    top left, top, top right, right, center, left, bottom left, bottom, bottom right, bottom, ...

The scene is drawn with dataset.py's own helpers (128x128 canvas, 4x supersampled anti-aliasing,
a plain mid-grey background at level 175, a shape of radius 14), so the bundled demo model
(models/shapes-llava) names the shape's cell in every still stretch. It is the same clip that the
Rust crate vlm-frames draws (`vlm_frames::synthetic::clip_frame`), up to anti-aliasing details.

    python models/shapes/make_clip.py --out /tmp/clip
    python models/shapes/make_clip.py --out /tmp/clip --frames 120 --still 12 --moving 4 \\
        --shape star --colour red

writes DIR/frame-0000.png, DIR/frame-0001.png, ... (file-name order is frame order) and prints,
for each still stretch, its frames and the expected answer to "Where is the <shape>?":

    frames 0000-0023: top left
"""
import argparse
import os

import numpy as np
from PIL import Image

from dataset import CANVAS, COLOURS, POSITIONS, SHAPES, _mask

# Cells (indices into POSITIONS) in visiting order: the snake, then the same way back.
ROUTE = [0, 1, 2, 5, 4, 3, 6, 7, 8, 7, 6, 3, 4, 5, 2, 1]
BACKGROUND = 175.0
RADIUS = 14.0


def cell_centre(cell):
    """Pixel centre of a cell of the 3x3 grid (row-major), as dataset.py places shapes."""
    step = CANVAS / 3
    row, col = divmod(cell, 3)
    return (col + 0.5) * step, (row + 0.5) * step


def shape_centre(i, still, moving):
    """(cx, cy, cell) for frame i; cell is None while the shape moves between cells."""
    if still == 0 and moving == 0:
        still = 1
    period = still + moving
    stop, within = divmod(i, period)
    src = ROUTE[stop % len(ROUTE)]
    fx, fy = cell_centre(src)
    if within < still:
        return fx, fy, src
    tx, ty = cell_centre(ROUTE[(stop + 1) % len(ROUTE)])
    # Never exactly at either end, so the first moving frame really differs from the still one.
    t = (within - still + 1) / (moving + 1)
    return fx + (tx - fx) * t, fy + (ty - fy) * t, None


def render(cx, cy, shape, colour):
    """One frame: the shape over the plain background, blended by its anti-aliased coverage."""
    m = _mask(shape, cx, cy, RADIUS, 0.0)[..., None]
    arr = BACKGROUND * (1 - m) + np.array(COLOURS[colour], dtype=np.float64) * m
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def write_clip(out_dir, frames, still, moving, shape, colour):
    """Writes the frames; returns [(first, last, position)] for each still stretch."""
    os.makedirs(out_dir, exist_ok=True)
    digits = max(4, len(str(max(frames - 1, 0))))
    stretches = []
    for i in range(frames):
        cx, cy, cell = shape_centre(i, still, moving)
        render(cx, cy, shape, colour).save(os.path.join(out_dir, f"frame-{i:0{digits}d}.png"))
        if cell is None:
            continue
        if stretches and stretches[-1][1] == i - 1 and stretches[-1][2] == POSITIONS[cell]:
            stretches[-1] = (stretches[-1][0], i, POSITIONS[cell])
        else:
            stretches.append((i, i, POSITIONS[cell]))
    return stretches, digits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--still", type=int, default=24, help="frames at rest in each cell")
    ap.add_argument("--moving", type=int, default=8, help="frames moving between cells")
    ap.add_argument("--shape", default="circle", choices=["circle"] + [s for s in SHAPES if s != "circle"])
    ap.add_argument("--colour", "--color", default="yellow", choices=list(COLOURS))
    args = ap.parse_args()
    if min(args.frames, args.still, args.moving) < 0:
        ap.error("--frames, --still and --moving must not be negative")
    stretches, digits = write_clip(args.out, args.frames, args.still, args.moving, args.shape, args.colour)
    for first, last, position in stretches:
        print(f"frames {first:0{digits}d}-{last:0{digits}d}: {position}")
    print(f"wrote {args.frames} frames to {args.out} (a {args.colour} {args.shape})")


if __name__ == "__main__":
    main()
