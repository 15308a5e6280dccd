#!/usr/bin/env python3
"""Synthetic "shapes" scenes with captions and question/answer pairs.

A scene is one or two shapes (circle, square, triangle, star, diamond) in named colours, each in one
cell of a 3×3 grid (top left … bottom right), at a random size and offset inside its cell, on a plain
or noisy background. Every answer is a short phrase determined by the scene alone:

    What colour is the star?     -> red            (also "color", "What is the colour of …", …)
    What shape is the red one?   -> star
    Where is the star?           -> top left
    Describe the image.          -> a red star and a blue circle   (reading order)
    How many shapes are there?   -> two

Used by train.py (scenes generated on the fly) and on its own to write a held-out evaluation set:

    python models/shapes/dataset.py --out /tmp/heldout --images 300 --seed 424242

which writes DIR/images/NNNN.png and DIR/questions.jsonl, one object per line:
{"image": "images/0000.png", "kind": "colour", "question": "...", "answer": "..."}
(`vlm-mesh eval --set DIR` reads exactly this).
"""
import argparse
import json
import math
import os
import random

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 128
# Shapes are drawn at this multiple of the canvas, then downsampled: anti-aliased edges.
SUPERSAMPLE = 4

COLOURS = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 225, 30),
    "green": (40, 165, 55),
    "blue": (35, 75, 225),
    "purple": (135, 50, 185),
    "pink": (250, 125, 195),
    "brown": (125, 75, 35),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ["circle", "square", "triangle", "star", "diamond"]
# Row-major 3×3 grid.
POSITIONS = [
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
]
KINDS = ["colour", "shape", "position", "describe", "count"]
NUMBERS = {1: "one", 2: "two"}

# Plain backgrounds: neutral greys from white to black, slightly tinted.
PLAIN_LEVELS = [(245, "light"), (215, "light"), (175, "mid"), (95, "dark"), (45, "dark"), (10, "dark")]


def _background(rng, noisy):
    """Returns (H×W×3 float array, tone) where tone says which shape colours would not stand out."""
    if noisy:
        level = rng.uniform(70, 190)
        tint = rng.normal(0, 12, size=3)
        base = np.clip(level + tint, 0, 255)
        arr = base + rng.normal(0, rng.uniform(10, 35), size=(CANVAS, CANVAS, 3))
        # A gentle gradient so "noisy" is not only white noise.
        g = np.linspace(-1, 1, CANVAS)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (np.cos(angle) * g[None, :] + np.sin(angle) * g[:, None]) * rng.uniform(0, 30)
        arr = arr + ramp[..., None]
        tone = "light" if level > 160 else ("dark" if level < 100 else "mid")
        return np.clip(arr, 0, 255), tone
    level, tone = PLAIN_LEVELS[rng.integers(len(PLAIN_LEVELS))]
    tint = rng.normal(0, 6, size=3)
    base = np.clip(level + tint, 0, 255)
    return np.broadcast_to(base, (CANVAS, CANVAS, 3)).astype(np.float64), tone


def _clashes(colour, tone):
    return (colour == "white" and tone == "light") or (colour == "black" and tone == "dark")


def _polygon(shape, cx, cy, r, rot):
    """Vertices of `shape` centred at (cx, cy) with outer radius r, rotated by rot radians."""
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * r * 0.78, y * r * 0.78) for x, y in pts]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a) + r * 0.15) for a in
               (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a) + r * 0.08))
    elif shape == "diamond":
        pts = [(0, -r), (r * 0.68, 0), (0, r), (-r * 0.68, 0)]
    else:
        raise ValueError(shape)
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _mask(shape, cx, cy, r, rot):
    """Anti-aliased coverage mask in [0, 1] at canvas resolution."""
    k = SUPERSAMPLE
    big = Image.new("L", (CANVAS * k, CANVAS * k), 0)
    d = ImageDraw.Draw(big)
    if shape == "circle":
        d.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=255)
    else:
        d.polygon([(x * k, y * k) for x, y in _polygon(shape, cx, cy, r, rot)], fill=255)
    small = big.resize((CANVAS, CANVAS), Image.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def random_scene(rng):
    """A scene description: background and 1–2 objects with distinct shapes, colours and cells."""
    noisy = bool(rng.random() < 0.5)
    n = 1 if rng.random() < 0.5 else 2
    cells = rng.choice(9, size=n, replace=False)
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    names = list(COLOURS)
    colours = rng.choice(len(names), size=n, replace=False)
    objects = []
    cell = CANVAS / 3
    for i in range(n):
        row, col = divmod(int(cells[i]), 3)
        r = rng.uniform(10.5, 17.0)
        # Keep the whole shape inside its cell, the centre well away from the cell edges.
        slack = max(0.0, cell / 2 - r - 2) * 0.8
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append({
            "shape": SHAPES[int(shapes[i])],
            "colour": names[int(colours[i])],
            "position": POSITIONS[int(cells[i])],
            "cell": int(cells[i]),
            "cx": cx, "cy": cy, "r": r,
            "rot": float(rng.uniform(-0.2, 0.2)),
            "jitter": [float(v) for v in rng.normal(0, 10, size=3)],
        })
    return {"noisy": noisy, "objects": objects, "bg_seed": int(rng.integers(2**31))}


def render(scene):
    bg_rng = np.random.default_rng(scene["bg_seed"])
    arr, tone = _background(bg_rng, scene["noisy"])
    arr = arr.copy()
    for o in scene["objects"]:
        if _clashes(o["colour"], tone):
            raise ValueError("clash")
        m = _mask(o["shape"], o["cx"], o["cy"], o["r"], o["rot"])[..., None]
        colour = np.clip(np.array(COLOURS[o["colour"]], dtype=np.float64) + o["jitter"], 0, 255)
        arr = arr * (1 - m) + colour * m
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def make_scene(rng):
    """Draws scenes until one has no shape that vanishes into its background."""
    while True:
        scene = random_scene(rng)
        tone = _background(np.random.default_rng(scene["bg_seed"]), scene["noisy"])[1]
        if not any(_clashes(o["colour"], tone) for o in scene["objects"]):
            return scene, render(scene)


def describe(scene):
    objs = sorted(scene["objects"], key=lambda o: o["cell"])
    return " and ".join(f"a {o['colour']} {o['shape']}" for o in objs)


def _colour_word(rng):
    return "colour" if rng.random() < 0.5 else "color"


def question(scene, kind, rng):
    """One (question, answer) pair of the given kind, with a randomly chosen phrasing."""
    objs = scene["objects"]
    o = objs[int(rng.integers(len(objs)))]
    single = len(objs) == 1
    cw = _colour_word(rng)
    pick = lambda options: options[int(rng.integers(len(options)))]
    if kind == "colour":
        q = pick([
            f"What {cw} is the {o['shape']}?",
            f"What is the {cw} of the {o['shape']}?",
            f"Which {cw} is the {o['shape']}?",
            f"What {cw} is the {o['shape']} in the image?",
        ])
        return q, o["colour"]
    if kind == "shape":
        options = [
            f"What shape is {o['colour']}?",
            f"What is the {o['colour']} shape?",
            f"Which shape is {o['colour']}?",
            f"What shape is the {o['colour']} object?",
        ]
        if single:
            options += ["What shape is in the image?", "What shape is this?", "Which shape is shown?"]
        return pick(options), o["shape"]
    if kind == "position":
        options = [
            f"Where is the {o['shape']}?",
            f"Where is the {o['colour']} shape?",
            f"Where is the {o['colour']} {o['shape']}?",
            f"Where is the {o['shape']} in the image?",
        ]
        return pick(options), o["position"]
    if kind == "describe":
        q = pick(["Describe the image.", "What is in the image?", "What do you see?",
                  "What is shown in this image?", "Describe the picture."])
        return q, describe(scene)
    if kind == "count":
        q = pick(["How many shapes are there?", "How many shapes are in the image?",
                  "How many objects are there?"])
        return q, NUMBERS[len(objs)]
    raise ValueError(kind)


def prompt(q):
    """The LLaVA-1.5 prompt the model is trained and evaluated with."""
    return f"USER: <image>\n{q} ASSISTANT:"


def corpus():
    """Every question and answer word the generator can produce (the tokenizer's training text)."""
    rng = np.random.default_rng(0)
    lines = set()
    for _ in range(3000):
        scene, _ = random_scene(rng), None
        for kind in KINDS:
            q, a = question(scene, kind, rng)
            lines.add(f"{prompt(q)} {a}")
    return sorted(lines)


def write_set(out_dir, n_images, seed, kinds=KINDS):
    """Writes n_images scenes and one question of every kind per image."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows = []
    for i in range(n_images):
        scene, img = make_scene(rng)
        rel = f"images/{i:04d}.png"
        img.save(os.path.join(out_dir, rel))
        for kind in kinds:
            q, a = question(scene, kind, rng)
            rows.append({"image": rel, "kind": kind, "question": q, "answer": a})
    with open(os.path.join(out_dir, "questions.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=None, help="default: random (a fresh set)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated question kinds")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rows = write_set(args.out, args.images, seed, args.kinds.split(","))
    print(f"wrote {args.images} images, {len(rows)} questions to {args.out} (seed {seed})")


if __name__ == "__main__":
    main()
