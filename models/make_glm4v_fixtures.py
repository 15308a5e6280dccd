#!/usr/bin/env python3
"""Writes the tiny GLM-4.1V checkpoint (Glm4vForConditionalGeneration) and its reference outputs
(issue 22). Run with the fixtures' virtualenv (transformers 5.25, torch 2.15):

    ~/vlm-venv/bin/python models/make_glm4v_fixtures.py

Outputs
- models/tiny-glm4v/   a random Glm4vForConditionalGeneration written by transformers itself:
                       vision tower (Conv3d patch embed, RMSNorms, bicubic-resampled 6x6 position
                       table, 2-D rope, 2 blocks, 2x2 downsample), merger, and a 2-layer GLM-4 text
                       model with M-RoPE (partial rotary 0.5, mrope_section [2, 3, 3], GQA 2:1);
                       a BPE tokenizer with GLM's special tokens and GLM-4.1V's chat template; the
                       default (torchvision) Glm4vImageProcessor with small pixel bounds.
- models/tiny-glm4v/reference/reference.json + reference.safetensors: per case the rendered
  prompt, the images, image_grid_thw, pixel_values, the tower's output before the merger
  (`features`), after it (`merged`), input_ids, the 3-D position ids of get_rope_index, the prefill
  logits and the greedy ids.

The cases cover a non-square image, an image smaller than the minimum area (upscaled), one larger
than the maximum (downscaled), two images in one prompt, and a text-only prompt.
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import transformers
from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessor,
    Glm4vProcessor,
    Glm4vVideoProcessor,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_fixtures import CORPUS, MIN_MARGIN, MODELS, randomise  # noqa: E402

OUT = os.path.join(MODELS, "tiny-glm4v")
NEW_TOKENS = 12

SPECIAL = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>",
]
# Added but not special, as in GLM-4.1V's tokenizer: they stay in decoded text.
PLAIN_ADDED = ["<think>", "</think>", "<answer>", "</answer>"]

# GLM-4.1V-9B-Thinking's chat template.
CHAT_TEMPLATE = """[gMASK]<sop>
{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- elif msg.role == 'user' %}
<|user|>{{ '\\n' }}

        {%- if msg.content is string %}
{{ msg.content }}
        {%- else %}
            {%- for item in msg.content %}
                {%- if item.type == 'video' or 'video' in item %}
<|begin_of_video|><|video|><|end_of_video|>
                {%- elif item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>
                {%- elif item.type == 'text' %}
{{ item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- elif msg.role == 'assistant' %}
        {%- if msg.metadata %}
<|assistant|>{{ msg.metadata }}
{{ msg.content }}
        {%- else %}
<|assistant|>
{{ msg.content }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=440,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = CORPUS + "\ndo(action=\"Tap\", element=[500, 300]) finish(message=\"done\")\n"
    lines = [l for l in corpus.strip().splitlines() if l]
    tok.train_from_iterator(lines * 4, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
    )
    hf_tok.add_tokens(PLAIN_ADDED, special_tokens=False)
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def test_image(width, height, seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse([width * 0.1, height * 0.1, width * 0.5, height * 0.6], fill=(220, 30, 40))
    draw.rectangle([width * 0.55, height * 0.4, width * 0.9, height * 0.9], fill=(20, 60, 230))
    return img


IMAGES = {
    # name: (width, height, seed)
    "glm4v_wide_90x50.png": (90, 50, 1),
    "glm4v_tall_60x130.png": (60, 130, 2),
    "glm4v_small_30x30.png": (30, 30, 3),
    "glm4v_large_400x260.png": (400, 260, 4),
}

CASES = [
    ("wide", ["glm4v_wide_90x50.png"], "What is shown in this image?"),
    ("tall", ["glm4v_tall_60x130.png"], "Describe the picture."),
    ("small", ["glm4v_small_30x30.png"], "What colour is the star?"),
    ("large", ["glm4v_large_400x260.png"], "Where is the square?"),
    ("two", ["glm4v_wide_90x50.png", "glm4v_tall_60x130.png"], "How many shapes are there?"),
    ("text", [], "The quick brown fox"),
]


def messages(images, text):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return [
        {"role": "system", "content": "You are a phone agent."},
        {"role": "user", "content": content},
    ]


def build(seed):
    hf_tok = make_tokenizer()
    tid = hf_tok.convert_tokens_to_ids
    vision = dict(
        depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
        image_size=84, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        rms_norm_eps=1e-5, attention_bias=True, hidden_act="silu",
    )
    text = dict(
        vocab_size=len(hf_tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
        # transformers' default context, so that Open-AutoGLM's max_tokens=3000 fits a three-step
        # history (tests/clients.rs); the positions the cases use are far below it.
        max_position_embeddings=32768,
        rms_norm_eps=1e-5, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5, "mrope_section": [2, 3, 3]},
        eos_token_id=[tid("<|endoftext|>"), tid("<|user|>"), tid("<|observation|>")],
        pad_token_id=tid("<|endoftext|>"),
    )
    cfg = Glm4vConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tid("<|image|>"),
        video_token_id=tid("<|video|>"),
        image_start_token_id=tid("<|begin_of_image|>"),
        image_end_token_id=tid("<|end_of_image|>"),
        video_start_token_id=tid("<|begin_of_video|>"),
        video_end_token_id=tid("<|end_of_video|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(cfg).eval()
    randomise(model, seed)
    model.generation_config.pad_token_id = tid("<|endoftext|>")
    model.generation_config.eos_token_id = text["eos_token_id"]

    ip = Glm4vImageProcessor(size={"shortest_edge": 28 * 28 * 2 * 4, "longest_edge": 28 * 28 * 2 * 24})
    processor = Glm4vProcessor(
        image_processor=ip, tokenizer=hf_tok, video_processor=Glm4vVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(OUT)
    processor.save_pretrained(OUT)
    with open(os.path.join(OUT, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)

    os.makedirs(os.path.join(MODELS, "images"), exist_ok=True)
    imgs = {}
    for name, (w, h, s) in IMAGES.items():
        path = os.path.join(MODELS, "images", name)
        test_image(w, h, s).save(path)
        imgs[name] = Image.open(path).convert("RGB")

    tensors, cases, worst = {}, [], float("inf")
    for case, names, question in CASES:
        prompt = processor.apply_chat_template(
            messages(names, question), add_generation_prompt=True, tokenize=False)
        kwargs = dict(text=prompt, return_tensors="pt")
        if names:
            kwargs["images"] = [imgs[n] for n in names]
        inputs = processor(**kwargs)
        ids = inputs["input_ids"]
        with torch.no_grad():
            extra = {}
            if names:
                pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
                vis = model.model.visual(pv, grid_thw=grid)
                extra = {
                    "pixel_values": pv.contiguous(),
                    "image_grid_thw": grid.to(torch.int64).contiguous(),
                    "features": vis.last_hidden_state.contiguous(),
                    "merged": vis.pooler_output.contiguous(),
                }
            pos, _ = model.model.get_rope_index(
                ids, inputs["mm_token_type_ids"],
                image_grid_thw=inputs.get("image_grid_thw"))
            out = model(**inputs)
            gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        new_ids = gen.sequences[0, ids.shape[1]:]
        scores = torch.stack([s[0] for s in gen.scores])
        top2 = scores.topk(2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
        worst = min(worst, margin)
        if margin < MIN_MARGIN or new_ids.shape[0] < 4:
            return None
        tensors.update({f"{case}.{k}": v for k, v in extra.items()})
        tensors[f"{case}.input_ids"] = ids[0].to(torch.int64).contiguous()
        tensors[f"{case}.position_ids"] = pos[:, 0].to(torch.int64).contiguous()
        tensors[f"{case}.prefill_logits"] = out.logits[0, -1].contiguous()
        tensors[f"{case}.greedy_ids"] = new_ids.to(torch.int64).contiguous()
        cases.append({
            "name": case,
            "images": [os.path.join("..", "images", n) for n in names],
            "prompt": prompt,
            "greedy_ids": new_ids.tolist(),
            "greedy_text": hf_tok.decode(new_ids, skip_special_tokens=True),
            "image_grid_thw": inputs["image_grid_thw"].tolist() if names else [],
            "min_greedy_margin": margin,
        })
    # Open-AutoGLM's history: a system string, user turns whose earlier images were removed
    # (text parts only), assistant turns as <think>/<answer> text, the last turn with a screenshot.
    screen = "** Screen Info **\n\n{\"current_app\": \"System Home\"}"
    history = [
        {"role": "system", "content": "You are a phone agent."},
        {"role": "user", "content": [{"type": "text", "text": "Open the settings\n\n" + screen}]},
        {"role": "assistant", "content": "<think>Find it.</think><answer>do(action=\"Tap\", element=[500, 300])</answer>"},
        {"role": "user", "content": [{"type": "text", "text": screen}]},
        {"role": "assistant", "content": "<think>Done.</think><answer>finish(message=\"done\")</answer>"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": screen}]},
    ]
    templates = [{
        "messages": history,
        "prompt": processor.apply_chat_template(history, add_generation_prompt=True, tokenize=False),
    }]
    ref = os.path.join(OUT, "reference")
    os.makedirs(ref, exist_ok=True)
    save_file(tensors, os.path.join(ref, "reference.safetensors"))
    with open(os.path.join(ref, "reference.json"), "w") as f:
        json.dump({
            "seed": seed,
            "cases": cases,
            "templates": templates,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }, f, indent=2)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(d, fn)) for d, _, fns in os.walk(OUT) for fn in fns)
    assert size < 2 << 20, f"{size} bytes (fixtures must stay under 2 MB)"
    return f"tiny-glm4v: seed={seed} worst margin={worst:.4f} bytes={size}"


def main():
    for seed in range(22, 72):
        summary = build(seed)
        if summary:
            print(summary)
            return
    raise SystemExit("no seed gives a greedy margin >= MIN_MARGIN on every case")


if __name__ == "__main__":
    main()
