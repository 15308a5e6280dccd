#!/usr/bin/env python3
"""Writes random-weight llava-hf checkpoints at realistic shapes, for benchmarks (`vlm-mesh bench`).

Speed does not depend on weight values, so the weights are random; nothing this writes is
committed (it is large). Run it in a virtualenv outside the repository:

    python3 -m venv ~/vlm-venv && ~/vlm-venv/bin/pip install torch torchvision transformers tokenizers safetensors
    ~/vlm-venv/bin/python models/make_bench_model.py small target/bench-models/small
    ~/vlm-venv/bin/python models/make_bench_model.py llava-1.5-7b target/bench-models/llava-1.5-7b

Sizes
- small:        CLIP ViT-B/16 @224 (12 layers, hidden 768) + LLaMA-style decoder (12 layers,
                hidden 768, MLP 2560, vocab 32000): ~150M decoder parameters, f32 on disk.
- small-vitl336: LLaVA-1.5's vision tower (CLIP ViT-L/14 @336, 576 features) + the small decoder,
                f32: the encoder dominates time to first token (cache benchmarks).
- llava-1.5-7b: the exact LLaVA-1.5-7B shapes (CLIP ViT-L/14 @336, 576 features; LLaMA-2-7B,
                vocab 32064), f16 on disk (~14 GB of disk).
- glm4v-9b:     GLM-4.1V-9B's shapes (its 24-block vision tower with the 2x2 merger; the GLM-4
                text model: 40 layers, hidden 4096, MLP 13696, 32 heads / 2 KV heads, vocab
                151552), bf16 on disk (~21 GB of disk), GLM-4.1V's special tokens and chat template.

Weights are written one tensor at a time (the model is built on PyTorch's meta device for its
names and shapes), so a 9B checkpoint needs little memory: about its largest tensor in f32 plus
one 2 GB shard. Normal(0, 0.02) matrices, norms 1, biases 0.

The tokenizer is a byte-level BPE whose vocabulary is synthetic (bytes, byte pairs, then byte
triples) but fills the model's whole vocabulary, so every id the random model samples decodes to
text.
"""
import argparse
import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

SIZES = {
    "small": dict(
        vision=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            projection_dim=512,
        ),
        text=dict(
            hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=12, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=False,
        ),
        vocab=32000,
        dtype=torch.float32,
    ),
    "llava-1.5-7b": dict(
        vision=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            projection_dim=768,
        ),
        text=dict(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False,
        ),
        vocab=32064,
        dtype=torch.float16,
    ),
    # GLM-4.1V-9B (zai-org/GLM-4.1V-9B-Thinking's config.json shapes; AutoGLM-Phone-9B's too).
    "glm4v-9b": dict(
        family="glm4v",
        vision=dict(
            depth=24, hidden_size=1536, num_heads=12, intermediate_size=13696, out_hidden_size=4096,
            image_size=336, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            rms_norm_eps=1e-5, attention_bias=False, hidden_act="silu",
        ),
        text=dict(
            hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
            num_key_value_heads=2, max_position_embeddings=65536, rms_norm_eps=1e-5,
            hidden_act="silu", attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]},
        ),
        vocab=151552,
        dtype=torch.bfloat16,
    ),
}
# LLaVA-1.5's own vision tower (CLIP ViT-L/14 @336, 576 features) in front of the small decoder:
# a checkpoint whose time to first token the encoder dominates, as with LLaVA-1.5 on CPU.
SIZES["small-vitl336"] = dict(
    vision=SIZES["llava-1.5-7b"]["vision"], text=SIZES["small"]["text"], vocab=32000,
    dtype=torch.float32,
)


def synthetic_bpe(specials, vocab_size):
    """A byte-level BPE of exactly vocab_size entries: specials, bytes, byte pairs, byte triples."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    for a in alphabet:
        for b in alphabet:
            for c in alphabet:
                if len(vocab) >= vocab_size:
                    break
                vocab[a + b + c] = len(vocab)
                merges.append((a + b, c))
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok, vocab


def make_tokenizer(vocab_size):
    tok, vocab = synthetic_bpe(SPECIALS, vocab_size)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def write_weights(model, out_dir, dtype, seed, zero_rows, shard_bytes=2 << 30):
    """Random tensors under the names and shapes of `model` (on the meta device), one at a time,
    into safetensors shards of at most shard_bytes (and the index transformers writes)."""
    from safetensors.torch import save_file

    params = list(model.state_dict().items())
    size = torch.tensor([], dtype=dtype).element_size()
    shards, current, used = [], [], 0
    for name, t in params:
        nbytes = t.numel() * size
        if current and used + nbytes > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append((name, tuple(t.shape)))
        used += nbytes
    shards.append(current)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                x = torch.zeros(shape, dtype=dtype)
            elif "norm" in name and len(shape) == 1:
                x = torch.ones(shape, dtype=dtype)
            else:
                x = (torch.randn(shape, generator=g) * 0.02).to(dtype)
            for rows_of, row in zero_rows:
                if name == rows_of:
                    x[row].zero_()
            tensors[name] = x.contiguous()
            weight_map[name] = fname
            total += x.numel() * size
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def llava(spec, out_dir):
    """The config, processor and tokenizer of a LLaVA-1.5 checkpoint; returns (config, eos id)."""
    hf_tok = make_tokenizer(spec["vocab"])
    text = dict(spec["text"])
    text.update(
        vocab_size=spec["vocab"],
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**spec["vision"]),
        text_config=LlamaConfig(**text),
        image_token_index=hf_tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    size = spec["vision"]["image_size"]
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )
    LlavaProcessor(
        image_processor=ip,
        tokenizer=hf_tok,
        patch_size=spec["vision"]["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(out_dir)
    return cfg, LlavaForConditionalGeneration, hf_tok.eos_token_id, hf_tok.pad_token_id


def glm4v(spec, out_dir):
    """GLM-4.1V's config, processor (transformers' defaults: up to 9.6M pixels) and a tokenizer
    with its special tokens and chat template; returns (config, eos id)."""
    from transformers import (Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessor,
                              Glm4vProcessor, Glm4vVideoProcessor)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_glm4v_fixtures import CHAT_TEMPLATE, PLAIN_ADDED, SPECIAL

    tok, _ = synthetic_bpe(SPECIAL, spec["vocab"] - len(PLAIN_ADDED))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
    )
    hf_tok.add_tokens(PLAIN_ADDED, special_tokens=False)
    assert len(hf_tok) == spec["vocab"], len(hf_tok)
    hf_tok.chat_template = CHAT_TEMPLATE
    tid = hf_tok.convert_tokens_to_ids
    text = dict(spec["text"])
    eos = tid("<|endoftext|>")
    text.update(vocab_size=spec["vocab"], eos_token_id=[eos, tid("<|user|>"), tid("<|observation|>")],
                pad_token_id=eos)
    cfg = Glm4vConfig(
        vision_config=spec["vision"],
        text_config=text,
        image_token_id=tid("<|image|>"),
        video_token_id=tid("<|video|>"),
        image_start_token_id=tid("<|begin_of_image|>"),
        image_end_token_id=tid("<|end_of_image|>"),
        video_start_token_id=tid("<|begin_of_video|>"),
        video_end_token_id=tid("<|end_of_video|>"),
        tie_word_embeddings=False,
    )
    Glm4vProcessor(
        image_processor=Glm4vImageProcessor(), tokenizer=hf_tok, video_processor=Glm4vVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    return cfg, Glm4vForConditionalGeneration, eos, eos


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("size", choices=sorted(SIZES))
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    spec = SIZES[args.size]
    os.makedirs(args.out_dir, exist_ok=True)
    build = glm4v if spec.get("family") == "glm4v" else llava
    cfg, cls, eos, pad = build(spec, args.out_dir)
    cfg.dtype = spec["dtype"]
    cfg.architectures = [cls.__name__]
    with torch.device("meta"):
        model = cls(cfg)
    # Never stop on EOS in a benchmark by chance: the EOS row of the LM head is zero.
    write_weights(model, args.out_dir, spec["dtype"], args.seed, [("lm_head.weight", eos)])
    model.config.save_pretrained(args.out_dir)
    model.generation_config.pad_token_id = pad
    model.generation_config.save_pretrained(args.out_dir)

    tower = model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower
    vis = sum(p.numel() for p in tower.parameters())
    dec = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    summary = {"size": args.size, "vision_params": vis, "decoder_params": dec, "dtype": str(spec["dtype"])}
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
