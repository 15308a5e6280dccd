#!/usr/bin/env python3
"""Trains the bundled demo model `models/shapes-llava`: a ~1M-parameter LlavaForConditionalGeneration
(CLIP ViT → MLP projector → LLaMA) that answers questions about the synthetic scenes of dataset.py.

CPU only, about 40 minutes on two cores. The committed checkpoint was made by three runs, the
second and third continuing the previous one (--init) at lower learning rates (README, "The bundled
demo model"; models/shapes-llava/training.json records all three):

    PY=~/vlm-venv/bin/python
    $PY models/shapes/train.py --out /tmp/shapes-b --log-every 150
    $PY models/shapes/train.py --init /tmp/shapes-b --out /tmp/shapes-c --vision-steps 0 --steps 1200 --lr 1e-3 --aux-weight 0.2
    $PY models/shapes/train.py --init /tmp/shapes-c --out models/shapes-llava --vision-steps 0 --steps 1500 --lr 7e-4 --aux-weight 0.2 --seed 2
    $PY models/shapes/make_fixtures.py      # samples, held-out set, parity reference

Shape is the hard part: with one 32x32 patch per grid cell, the vision tower must tell five shapes
apart at any size and colour from one linear patch embedding, which takes thousands of steps on the
per-cell probes (stage 1 prints their held-out accuracy); colour is learnt in a few hundred.

The architecture uses only what vlm-model implements (CLIP vision with quick_gelu, an integer
`vision_feature_layer`, `default` strategy; linear → gelu → linear projector; LLaMA with MHA and
default RoPE), and the image processor is `CLIPImageProcessorPil` with a shortest-edge bicubic resize
and centre crop, which vlm-model reproduces bit for bit. The tokenizer is a byte-level BPE trained on
the generator's questions and answers, so every word the scenes use is one token and any other text
still tokenises. The loss covers only the answer tokens and the end-of-sequence token.
"""
import argparse
import json
import math
import re
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import transformers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "models", "shapes-llava")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# One 32×32 patch per cell of the scenes' 3×3 grid: 9 image tokens, each showing at most one shape.
IMAGE_SIZE = 96
PATCH = 32
VISION = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    projection_dim=64,
)
TEXT = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False,
)


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = dataset.corpus()
    # Rare words (e.g. "one") would otherwise stay split; every scene word becomes one token.
    words = sorted({w for line in lines for w in re.findall(r"[A-Za-z]+", line)})
    tok.train_from_iterator(lines + [" ".join(" " + w for w in words)] * 50, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build(hf_tok):
    image_token_id = hf_tok.convert_tokens_to_ids("<image>")
    text = dict(TEXT)
    text.update(
        vocab_size=len(hf_tok),
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(**text),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )
    processor = LlavaProcessor(
        image_processor=ip,
        tokenizer=hf_tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


class Encoder:
    """Token ids of prompts (image tokens expanded as LlavaProcessor does) and answers, memoised."""

    def __init__(self, processor):
        self.tok = processor.tokenizer
        self.n_image = (IMAGE_SIZE // PATCH) ** 2
        self.image_token = self.tok.convert_tokens_to_ids("<image>")
        self.cache = {}
        ids = self.prompt_ids("?")
        # "<s> USER: <image>×N \n" is shared by every question about one image.
        self.prefix = ids[: len(ids) - ids[::-1].index(self.image_token) + 1]

    def prompt_ids(self, q):
        key = ("p", q)
        if key not in self.cache:
            text = dataset.prompt(q).replace("<image>", "<image>" * self.n_image)
            self.cache[key] = self.tok(text)["input_ids"]
        return self.cache[key]

    def branch_ids(self, q):
        """The prompt after the shared prefix."""
        ids = self.prompt_ids(q)
        assert ids[: len(self.prefix)] == self.prefix, q
        return ids[len(self.prefix):]

    def answer_ids(self, a):
        key = ("a", a)
        if key not in self.cache:
            self.cache[key] = self.tok(" " + a, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return self.cache[key]


def make_pool(processor, n, seed):
    """n scenes and their pixel values (the processor's own PIL preprocessing)."""
    rng = np.random.default_rng(seed)
    scenes, pixels = [], []
    chunk = []
    for i in range(n):
        scene, img = dataset.make_scene(rng)
        scenes.append(scene)
        chunk.append(img)
        if len(chunk) == 256 or i == n - 1:
            pixels.append(processor.image_processor(chunk, return_tensors="pt")["pixel_values"])
            chunk = []
    return scenes, torch.cat(pixels)


def questions(scene, rng, kinds):
    """Several questions about one scene: every kind, asked about every object where that differs."""
    out = []
    for kind in kinds:
        reps = len(scene["objects"]) if kind in ("colour", "shape", "position") else 1
        for _ in range(reps):
            q, a = dataset.question(scene, kind, rng)
            out.append((kind, q, a))
    return out


def batch(enc, scenes, pixels, idx, rng, kinds=dataset.KINDS):
    """Packs all questions about one image into one row: the shared prefix (image included) once,
    then one branch per question that attends to the prefix and to itself only, with the positions
    it would have on its own. Equivalent to one sequence per question, at a fraction of the cost."""
    rows = []
    for i in idx:
        ids, pos, branch, target, kind_of = list(enc.prefix), list(range(len(enc.prefix))), [0] * len(enc.prefix), [-100] * len(enc.prefix), [None] * len(enc.prefix)
        for b, (kind, q, a) in enumerate(questions(scenes[i], rng, kinds), start=1):
            p, ans = enc.branch_ids(q), enc.answer_ids(a)
            seq = p + ans
            ids += seq
            pos += list(range(len(enc.prefix), len(enc.prefix) + len(seq)))
            branch += [b] * len(seq)
            # Position t predicts token t+1 of its own branch; only answer tokens are learned.
            target += [-100] * (len(p) - 1) + ans + [-100]
            kind_of += [None] * (len(p) - 1) + [(b, kind)] * len(ans) + [None]
        rows.append((ids, pos, branch, target, kind_of))
    n = max(len(r[0]) for r in rows)
    B = len(rows)
    ids = torch.full((B, n), enc.tok.pad_token_id, dtype=torch.long)
    pos = torch.zeros((B, n), dtype=torch.long)
    br = torch.full((B, n), -1, dtype=torch.long)
    tgt = torch.full((B, n), -100, dtype=torch.long)
    kinds_out = []
    for j, (i_, p_, b_, t_, k_) in enumerate(rows):
        L = len(i_)
        ids[j, :L] = torch.tensor(i_)
        pos[j, :L] = torch.tensor(p_)
        br[j, :L] = torch.tensor(b_)
        tgt[j, :L] = torch.tensor(t_)
        kinds_out.append(k_ + [None] * (n - L))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same = (br[:, :, None] == br[:, None, :]) | (br[:, None, :] == 0)
    mask = (causal & same & (br[:, None, :] >= 0))
    mask |= torch.eye(n, dtype=torch.bool)  # padding rows attend to themselves (no all-masked rows)
    return ids, pos, mask[:, None], tgt, pixels[torch.as_tensor(idx)], kinds_out


class CellHeads(torch.nn.Module):
    """Training-only probes (not saved): each image token must tell the colour and shape in its grid
    cell, or "empty". Without them the randomly initialised decoder learns the answer prior long
    before it learns to read the image (accuracy sat at chance for hundreds of steps); with them the
    vision tower yields clean per-cell features (colour within a few hundred steps, shape within a few thousand) and the decoder learns to
    look them up."""

    def __init__(self, dim):
        super().__init__()
        assert IMAGE_SIZE // PATCH == 3, "one image token per grid cell"
        self.colour = torch.nn.Linear(dim, len(dataset.COLOURS) + 1)
        self.shape = torch.nn.Linear(dim, len(dataset.SHAPES) + 1)

    @staticmethod
    def targets(scenes):
        names = list(dataset.COLOURS)
        col = torch.full((len(scenes), 9), len(names))
        shp = torch.full((len(scenes), 9), len(dataset.SHAPES))
        for i, s in enumerate(scenes):
            for o in s["objects"]:
                col[i, o["cell"]] = names.index(o["colour"])
                shp[i, o["cell"]] = dataset.SHAPES.index(o["shape"])
        return col, shp

    def loss(self, model, pixel_values, col, shp):
        layer = model.config.vision_feature_layer
        feats = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer][:, 1:]
        return F.cross_entropy(self.colour(feats).flatten(0, 1), col.flatten()) + F.cross_entropy(
            self.shape(feats).flatten(0, 1), shp.flatten()
        )


    @torch.no_grad()
    def accuracy(self, model, pixel_values, col, shp):
        layer = model.config.vision_feature_layer
        feats = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer][:, 1:]
        occupied = shp != len(dataset.SHAPES)
        c = (self.colour(feats).argmax(-1) == col)[occupied].float().mean().item()
        s = (self.shape(feats).argmax(-1) == shp)[occupied].float().mean().item()
        return f"colour {c:.3f} shape {s:.3f}"


def loss_fn(model, ids, pos, mask, tgt, pv, kinds_of):
    hidden = model.model(input_ids=ids, pixel_values=pv, attention_mask=mask, position_ids=pos).last_hidden_state
    keep = tgt != -100
    logits = model.lm_head(hidden[keep])
    target = tgt[keep]
    loss = F.cross_entropy(logits, target)
    # Exact match per question and kind: every answer token right.
    with torch.no_grad():
        ok = (logits.argmax(-1) == target).tolist()
        per = {}
        flat_keys = []
        for r, row in enumerate(kinds_of):
            flat_keys += [(r,) + k for k in row if k is not None]
        answers = {}
        for key, good in zip(flat_keys, ok):
            answers[key] = answers.get(key, True) and good
        for (r, b, kind), good in answers.items():
            hit, total = per.get(kind, (0, 0))
            per[kind] = (hit + good, total + 1)
    return loss, {k: h / t for k, (h, t) in per.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=16, help="images per step (each with 5-8 questions)")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--pool", type=int, default=8000, help="training scenes (a fresh question each visit)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--vision-steps", type=int, default=4000, help="vision-only warm-up steps on the cell probes")
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the cell probes' loss in stage 2")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--init", help="continue from this saved checkpoint instead of random weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    if args.init:
        # Continue training a saved checkpoint (its tokenizer and processor included).
        model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        processor = LlavaProcessor.from_pretrained(args.init)
        hf_tok = processor.tokenizer
    else:
        hf_tok = make_tokenizer()
        model, processor = build(hf_tok)
    enc = Encoder(processor)
    for line in dataset.corpus():
        a = line.split("ASSISTANT: ", 1)[1]
        for word in a.split():
            assert len(enc.answer_ids(word)) == 2, f"answer word {word!r} is not one token"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(hf_tok)}, {n_params / 1e6:.2f}M parameters", flush=True)

    scenes, pixels = make_pool(processor, args.pool, seed=args.seed)
    val_scenes, val_pixels = make_pool(processor, 256, seed=args.seed + 1_000_003)
    print(f"pools ready in {time.time() - t0:.0f}s", flush=True)

    heads = CellHeads(VISION["hidden_size"])
    col, shp = CellHeads.targets(scenes)
    rng = np.random.default_rng(args.seed)

    # Stage 1 (~15 min): the vision tower alone learns per-cell colour and shape.
    vopt = torch.optim.AdamW(list(model.model.vision_tower.parameters()) + list(heads.parameters()), lr=args.lr)
    for step in range(1, args.vision_steps + 1):
        idx = torch.as_tensor(rng.integers(len(scenes), size=64))
        aux = heads.loss(model, pixels[idx], col[idx], shp[idx])
        vopt.zero_grad(set_to_none=True)
        aux.backward()
        vopt.step()
        if step % 500 == 0 or step == args.vision_steps:
            print(f"vision step {step}: cell loss {aux.item():.3f}, held-out occupied cells: "
                  + heads.accuracy(model, val_pixels, *CellHeads.targets(val_scenes)), flush=True)
    if args.vision_steps:
        print(f"vision warm-up: {args.vision_steps} steps, cell loss {aux.item():.3f}, {time.time() - t0:.0f}s", flush=True)

    # Stage 2: everything, on answer tokens, keeping the cell probes as an auxiliary loss.
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    model.train()
    t_train = time.time()
    for step in range(1, args.steps + 1):
        idx = rng.integers(len(scenes), size=args.batch)
        b = batch(enc, scenes, pixels, idx, rng)
        loss, _ = loss_fn(model, *b)
        ti = torch.as_tensor(idx)
        aux = heads.loss(model, b[4], col[ti], shp[ti])
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                _, val = loss_fn(model, *batch(enc, val_scenes, val_pixels, np.arange(len(val_scenes)), np.random.default_rng(0)))
            model.train()
            el = time.time() - t_train
            print(
                f"step {step} loss {loss.item():.4f} cell {aux.item():.3f} | val exact "
                + " ".join(f"{k} {v:.3f}" for k, v in sorted(val.items()))
                + f" | {el:.0f}s ({el / step:.2f}s/step)",
                flush=True,
            )

    model.eval()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(
            {
                "init": args.init, "steps": args.steps, "vision_steps": args.vision_steps, "aux_weight": args.aux_weight, "batch": args.batch, "lr": args.lr, "pool": args.pool,
                "seed": args.seed, "threads": args.threads, "parameters": n_params,
                "train_seconds": round(time.time() - t_train), "total_seconds": round(time.time() - t0),
                "transformers": transformers.__version__, "torch": torch.__version__,
            },
            f,
            indent=2,
        )
        f.write("\n")
    print(f"saved to {args.out} after {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
