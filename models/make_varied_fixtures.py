#!/usr/bin/env python3
"""Writes one tiny checkpoint per supported family whose config sets every field the loader reads
away from its default (issue 38), and its transformers references. Run it with the fixtures'
virtualenv (transformers 5.25, torch 2.15):

    ~/vlm-venv/bin/python models/make_varied_fixtures.py

Each value is chosen so that a loader that ignores it, reads it from the wrong sub-config or puts
a default in its place computes something else: odd rope bases (100, 300, 800, 5000), llama3 and
linear rope scaling, partial rotary factors, head_dim apart from hidden/heads, GQA, norm epsilons
of 1e-3/1e-4, non-default activations, attention/MLP biases on where the default is off (and off
where it is on), tied heads, feature layers and strategies, pinpoints, image mean/std (with and
without rescaling), bilinear resampling, pixel bounds, patch/merge/temporal sizes, M-RoPE
sections, special-token ids that are not the defaults, and an extra end-of-sequence id in
generation_config.json that a case's greedy path reaches.

Outputs, for NAME in varied-llava (LLaVA-1.5), varied-llava-next (LLaVA-NeXT, Mistral decoder),
varied-llava-glm (GLM-4 decoder) and varied-glm4v (GLM-4.1V):
- models/NAME/                    the checkpoint, written by transformers
- models/NAME/reference/reference.json         per case: images, prompt, greedy ids
- models/NAME/reference/reference.safetensors  per case: input ids and the image rows the
                                               language model receives (`CASE.image_rows`)

`shared/model/tests/varied.rs` compares greedy tokens and image rows;
`shared/model/tests/field_coverage.rs` checks that every key the loader reads is varied.
"""
import json
import os
import sys

import torch
from PIL import Image
from safetensors.torch import save_file

import transformers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Glm4Config,
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessorPil,
    Glm4vProcessor,
    Glm4vVideoProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_fixtures import MIN_MARGIN, MODELS, make_tokenizer, randomise  # noqa: E402
import make_glm4v_fixtures as glm4v_base  # noqa: E402

IMAGES = os.path.join(MODELS, "images")
NEW_TOKENS = 10
# The step of the first case whose greedy token becomes an extra end-of-sequence id.
STOP_STEP = 6


def llava_tokenizer():
    """A byte-level BPE whose special tokens sit at ids no config default has (bos 4, eos 3, image
    2), so that a loader falling back to a default id reads another token."""
    return make_tokenizer(None, special_tokens=["<pad>", "<unk>", "<image>", "</s>", "<s>"], vocab_size=430)


def image(name):
    return Image.open(os.path.join(IMAGES, name)).convert("RGB")


LLAVA_PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
LLAVA_TWO = "USER: <image>\nLook at this. <image>\nHow many shapes are there? ASSISTANT:"


def llava_text_ids(tok):
    t = tok.convert_tokens_to_ids
    # Two end-of-sequence ids in text_config (the tokenizer's and <unk>).
    return dict(bos_token_id=t("<s>"), eos_token_id=[t("</s>"), t("<unk>")], pad_token_id=t("<pad>"))


def build_llava(seed):
    tok = llava_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5, image_size=28,
        patch_size=7, hidden_act="gelu_new", layer_norm_eps=1e-3, projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=300, rms_norm_eps=1e-3,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 300.0, "factor": 4.0, "low_freq_factor": 1.5,
            "high_freq_factor": 3.0, "original_max_position_embeddings": 24,
        },
        hidden_act="gelu", attention_bias=True, mlp_bias=True, tie_word_embeddings=True, **llava_text_ids(tok),
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="relu", multimodal_projector_bias=False, vision_feature_layer=[-2, 1],
        vision_feature_select_strategy="full", tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(cfg)
    # Not resized: each image is centre-cropped to 28x28 as it is.
    ip = CLIPImageProcessorPil(
        do_resize=False, size={"shortest_edge": 40}, resample=2, do_center_crop=True,
        crop_size={"height": 28, "width": 28}, do_rescale=True, rescale_factor=1 / 200,
        image_mean=[0.3, 0.6, 0.45], image_std=[0.2, 0.35, 0.25], do_convert_rgb=False,
    )
    processor = LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=7, vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
    )
    cases = [
        ("one", ["shapes-64x40.png"], LLAVA_PROMPT),
        ("two", ["shapes-48x48.png", "shapes-64x40.png"], LLAVA_TWO),
    ]
    return model, processor, tok, cases


def build_llava_next(seed):
    tok = llava_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=36, intermediate_size=60, num_hidden_layers=3, num_attention_heads=3, image_size=20,
        patch_size=5, hidden_act="gelu", layer_norm_eps=2e-4, projection_dim=16,
    )
    # Mistral: its sliding window caps the usable context (far beyond these prompts).
    text = MistralConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, sliding_window=600,
        rms_norm_eps=1e-4, rope_parameters={"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.5},
        hidden_act="gelu_pytorch_tanh", tie_word_embeddings=False, **llava_text_ids(tok),
    )
    pinpoints = [[20, 40], [40, 20], [40, 40], [60, 20]]
    cfg = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints, projector_hidden_act="quick_gelu", multimodal_projector_bias=True,
        vision_feature_layer=-3, vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(cfg)
    # No rescaling: mean and std in 0..255 units keep the values O(1).
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20}, do_center_crop=True, resample=2,
        do_rescale=False, do_normalize=True, image_mean=[120.0, 110.0, 100.0], image_std=[60.0, 70.0, 65.0],
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=ip, tokenizer=tok, patch_size=5, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    cases = [
        ("tall", ["next-tall-36x90.png"], LLAVA_PROMPT),
        ("wide", ["next-wide-100x40.png"], LLAVA_PROMPT),
    ]
    return model, processor, tok, cases


def build_llava_glm(seed):
    tok = llava_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=24,
        patch_size=6, hidden_act="gelu", layer_norm_eps=1e-4, projection_dim=16,
    )
    text = Glm4Config(
        vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=20, max_position_embeddings=512, rms_norm_eps=1e-4,
        rope_parameters={"rope_type": "default", "rope_theta": 800.0, "partial_rotary_factor": 0.6},
        hidden_act="gelu", attention_bias=False, tie_word_embeddings=True, **llava_text_ids(tok),
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="silu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(cfg)
    # An exact resize to the tower's 24x24, no centre crop, no normalisation.
    ip = CLIPImageProcessorPil(
        size={"height": 24, "width": 24}, resample=3, do_center_crop=False, do_normalize=False,
    )
    processor = LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=6, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    cases = [
        ("one", ["shapes-48x48.png"], LLAVA_PROMPT),
        ("two", ["shapes-64x40.png", "shapes-48x48.png"], LLAVA_TWO),
    ]
    return model, processor, tok, cases


def build_glm4v(seed):
    tok = glm4v_base.make_tokenizer()
    t = tok.convert_tokens_to_ids
    unit = 7 * 3  # patch x merge
    vision = dict(
        depth=3, hidden_size=48, num_heads=4, intermediate_size=40, out_hidden_size=64, image_size=42,
        patch_size=7, spatial_merge_size=3, temporal_patch_size=3, rms_norm_eps=1e-3, attention_bias=True,
        hidden_act="gelu", rope_parameters={"rope_type": "axial", "rope_theta": 500.0},
    )
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-3, hidden_act="gelu",
        rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.75,
                         "mrope_section": [1, 3, 2]},
        eos_token_id=[t("<|endoftext|>"), t("<|user|>")], pad_token_id=t("<|endoftext|>"),
    )
    cfg = Glm4vConfig(
        vision_config=vision, text_config=text, image_token_id=t("<|image|>"), video_token_id=t("<|video|>"),
        image_start_token_id=t("<|begin_of_image|>"), image_end_token_id=t("<|end_of_image|>"),
        video_start_token_id=t("<|begin_of_video|>"), video_end_token_id=t("<|end_of_video|>"),
        # At the top level only, where transformers 5 reads it.
        tie_word_embeddings=True,
    )
    model = Glm4vForConditionalGeneration(cfg)
    # The PIL backend (the default is torchvision's): image_processor_type then names it.
    ip = Glm4vImageProcessorPil(
        size={"shortest_edge": unit * unit * 6, "longest_edge": unit * unit * 20}, patch_size=7, merge_size=3,
        temporal_patch_size=3, resample=2, image_mean=[0.45, 0.4, 0.5], image_std=[0.3, 0.25, 0.2],
    )
    processor = Glm4vProcessor(
        image_processor=ip, tokenizer=tok, video_processor=Glm4vVideoProcessor(),
        chat_template=glm4v_base.CHAT_TEMPLATE,
    )

    def prompt(names, text):
        return processor.apply_chat_template(glm4v_base.messages(names, text), add_generation_prompt=True,
                                             tokenize=False)

    cases = [
        ("wide", ["glm4v_wide_90x50.png"], prompt(["a"], "What is shown in this image?")),
        ("tall", ["glm4v_tall_60x130.png"], prompt(["a"], "Describe the picture.")),
        ("two", ["glm4v_wide_90x50.png", "glm4v_small_30x30.png"], prompt(["a", "b"], "How many shapes are there?")),
        ("text", [], prompt([], "The quick brown fox")),
    ]
    return model, processor, tok, cases


FAMILIES = [
    ("varied-llava", build_llava),
    ("varied-llava-next", build_llava_next),
    ("varied-llava-glm", build_llava_glm),
    ("varied-glm4v", build_glm4v),
]


def inputs_of(processor, names, prompt):
    kwargs = dict(text=prompt, return_tensors="pt")
    if names:
        kwargs["images"] = [image(n) for n in names]
    return processor(**kwargs)


def run_case(model, image_token_id, inputs, eos):
    """Greedy ids (stopping at `eos`), their smallest top-1/top-2 margin, and the image rows the
    language model receives (captured from its inputs_embeds)."""
    seen = {}

    def hook(_module, _args, kwargs):
        if "rows" not in seen and kwargs.get("inputs_embeds") is not None:
            seen["rows"] = kwargs["inputs_embeds"][0]

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                                 output_scores=True, return_dict_in_generate=True)
    finally:
        handle.remove()
    ids = inputs["input_ids"]
    new_ids = gen.sequences[0, ids.shape[1]:]
    scores = torch.stack([s[0] for s in gen.scores])
    top2 = scores.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    rows = seen["rows"][ids[0] == image_token_id]
    return new_ids, margin, rows


def backend_name(out, processor):
    """transformers 5 saves a PIL-backend image processor under its base class name (the backend
    is the loader's choice, `backend="pil"`); name the PIL class, which is how vlm-model is told."""
    cls = type(processor.image_processor).__name__
    if not cls.endswith("Pil"):
        return
    path = os.path.join(out, "processor_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["image_processor"]["image_processor_type"] = cls
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def build(name, builder, seed):
    torch.manual_seed(seed)
    model, processor, tok, cases = builder(seed)
    model = model.eval()
    randomise(model, seed)
    text_eos = model.config.text_config.eos_token_id
    text_eos = list(text_eos) if isinstance(text_eos, (list, tuple)) else [text_eos]
    image_token_id = model.config.image_token_id
    # First pass with the text config's end ids only: the first case's token at STOP_STEP becomes
    # one more end id, in generation_config.json alone, so that the second pass stops there.
    first = inputs_of(processor, cases[0][1], cases[0][2])
    probe, _, _ = run_case(model, image_token_id, first, text_eos)
    if len(probe) <= STOP_STEP or int(probe[STOP_STEP]) in probe[:STOP_STEP].tolist():
        return None
    stop = int(probe[STOP_STEP])
    eos = text_eos + [stop]
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    tensors, meta, worst = {}, [], float("inf")
    for case, names, prompt in cases:
        inputs = inputs_of(processor, names, prompt)
        new_ids, margin, rows = run_case(model, image_token_id, inputs, eos)
        worst = min(worst, margin)
        if margin < MIN_MARGIN or len(new_ids) < 4:
            return None
        tensors[f"{case}.input_ids"] = inputs["input_ids"][0].to(torch.int64).contiguous()
        if names:
            tensors[f"{case}.image_rows"] = rows.contiguous()
        meta.append({
            "name": case,
            "images": [os.path.join("..", "images", n) for n in names],
            "prompt": prompt,
            "greedy_ids": new_ids.tolist(),
            "greedy_text": tok.decode(new_ids, skip_special_tokens=True),
            "min_greedy_margin": margin,
        })
    if len(meta[0]["greedy_ids"]) != STOP_STEP + 1:
        return None  # the extra end id must end the first case
    out = os.path.join(MODELS, name)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    backend_name(out, processor)
    # What transformers reads back from the directory answers as the model in memory did.
    reloaded = type(model).from_pretrained(out).eval()
    again, _, _ = run_case(reloaded, image_token_id, first, eos)
    assert again.tolist() == meta[0]["greedy_ids"], f"{name}: the saved checkpoint answers otherwise"
    ref = os.path.join(out, "reference")
    os.makedirs(ref, exist_ok=True)
    save_file(tensors, os.path.join(ref, "reference.safetensors"))
    with open(os.path.join(ref, "reference.json"), "w") as f:
        json.dump({"seed": seed, "generation_eos": eos, "cases": meta,
                   "transformers": transformers.__version__, "torch": torch.__version__}, f, indent=2)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(d, fn)) for d, _, fns in os.walk(out) for fn in fns)
    assert size < 2 << 20, f"{name}: {size} bytes (fixtures must stay under 2 MB)"
    return f"{name}: seed={seed} worst margin={worst:.4f} bytes={size}"


def main():
    only = sys.argv[1:]
    for name, builder in FAMILIES:
        if only and name not in only:
            continue
        for seed in range(100, 160):
            summary = build(name, builder, seed)
            if summary:
                print(summary)
                break
        else:
            raise SystemExit(f"{name}: no seed gives a greedy margin >= {MIN_MARGIN} on every case")


if __name__ == "__main__":
    main()
