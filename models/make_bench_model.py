#!/usr/bin/env python3
"""Writes random-weight llava-hf checkpoints at realistic shapes, for benchmarks (`vlm-mesh bench`).

Speed does not depend on weight values, so the weights are random; nothing this writes is
committed (it is large). Run it in a virtualenv outside the repository:

    python3 -m venv ~/vlm-venv && ~/vlm-venv/bin/pip install torch transformers tokenizers safetensors
    ~/vlm-venv/bin/python models/make_bench_model.py small target/bench-models/small
    ~/vlm-venv/bin/python models/make_bench_model.py llava-1.5-7b target/bench-models/llava-1.5-7b

Sizes
- small:        CLIP ViT-B/16 @224 (12 layers, hidden 768) + LLaMA-style decoder (12 layers,
                hidden 768, MLP 2560, vocab 32000): ~150M decoder parameters, f32 on disk.
- small-vitl336: LLaVA-1.5's vision tower (CLIP ViT-L/14 @336, 576 features) + the small decoder,
                f32: the encoder dominates time to first token (cache benchmarks).
- llava-1.5-7b: the exact LLaVA-1.5-7B shapes (CLIP ViT-L/14 @336, 576 features; LLaMA-2-7B,
                vocab 32064), f16 on disk (~14 GB; needs that much free disk and ~16 GB RAM).

The tokenizer is a byte-level BPE whose vocabulary is synthetic (bytes, then byte pairs) but fills
the model's whole vocabulary, so every id the random model samples decodes to text.
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
            num_key_value_heads=12, max_position_embeddings=2048, rms_norm_eps=1e-6,
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
}
# LLaVA-1.5's own vision tower (CLIP ViT-L/14 @336, 576 features) in front of the small decoder:
# a checkpoint whose time to first token the encoder dominates, as with LLaVA-1.5 on CPU.
SIZES["small-vitl336"] = dict(
    vision=SIZES["llava-1.5-7b"]["vision"], text=SIZES["small"]["text"], vocab=32000,
    dtype=torch.float32,
)


def make_tokenizer(vocab_size):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("size", choices=sorted(SIZES))
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    spec = SIZES[args.size]
    os.makedirs(args.out_dir, exist_ok=True)

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
    torch.manual_seed(args.seed)
    torch.set_default_dtype(spec["dtype"])
    model = LlavaForConditionalGeneration(cfg).eval()
    # Random weights at the default init (speed does not depend on them). Never stop on EOS in
    # a benchmark by chance: push the EOS logit down.
    with torch.no_grad():
        model.lm_head.weight[hf_tok.eos_token_id].zero_()
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(args.out_dir, max_shard_size="2GB")

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
    ).save_pretrained(args.out_dir)

    vis = sum(p.numel() for p in model.model.vision_tower.parameters())
    dec = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    summary = {"size": args.size, "vision_params": vis, "decoder_params": dec, "dtype": str(spec["dtype"])}
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
