#!/usr/bin/env python3
"""llama.cpp's side of `vlm-mesh bench quantized` (see scripts/setup_llama_cpp.sh).

    --extract LLAVA_DIR OUT_DIR   write LLAVA_DIR's language model as a LlamaForCausalLM directory
    --serve --gguf-dir DIR ...    read one request per line from stdin, run one generation, print
                                  one JSON line: {"gguf", "prompt_tokens", "prefill_ms", "decode_tok_s"}
                                  A request is a GGUF file name (--prompt-tokens, --max-tokens), or
                                  {"gguf": NAME, "prompt_tokens": P, "max_tokens": M}.

A generation: a prompt of P token ids (prefill, in batches of --n-batch), then M greedy tokens;
decode tokens/s = (tokens - 1) / time from the first token to the last, as ours is measured.
--threads applies to prefill and decode. llama.cpp runs in its default (best) configuration for
the CPU, its weight repacking ("extra buffer types") included; --no-extra-bufts turns that off
(it crashed on a Sapphire Rapids VM with AMX in 0.3.36; see BENCHMARKS.md).
"""
import argparse
import json
import sys
import time


def extract(src, dst):
    import os
    import shutil
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    cfg = json.load(open(f"{src}/config.json"))
    text = dict(cfg["text_config"])
    text["architectures"] = ["LlamaForCausalLM"]
    text.setdefault("model_type", "llama")
    json.dump(text, open(f"{dst}/config.json", "w"), indent=1)
    index = f"{src}/model.safetensors.index.json"
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    # One output shard per input shard (a 7B checkpoint never whole in memory), with an index.
    weight_map = {}
    for n, f in enumerate(files):
        out = {}
        for k, v in load_file(f"{src}/{f}").items():
            for old, new in (("language_model.model.", "model."), ("model.language_model.", "model."),
                             ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")):
                if k.startswith(old):
                    out[new + k[len(old):]] = v.contiguous()
                    break
        if out:
            name = f"model-{n + 1:05d}.safetensors"
            save_file(out, f"{dst}/{name}", metadata={"format": "pt"})
            weight_map.update({k: name for k in out})
        del out
    json.dump({"metadata": {}, "weight_map": weight_map}, open(f"{dst}/model.safetensors.index.json", "w"))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if os.path.exists(f"{src}/{f}"):
            shutil.copy(f"{src}/{f}", dst)


def serve(a):
    import llama_cpp
    import llama_cpp.llama as high_level
    from llama_cpp import Llama

    if a.no_extra_bufts:
        default_params = llama_cpp.llama_model_default_params

        def params():
            p = default_params()
            p.use_extra_bufts = False
            return p

        high_level.llama_cpp.llama_model_default_params = params

    models = {}
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            req = json.loads(line)
        else:
            req = {"gguf": line, "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens}
        name, n_prompt, n_gen = req["gguf"], int(req["prompt_tokens"]), int(req["max_tokens"])
        llm = models.get(name)
        if llm is None:
            n_ctx = max(a.n_ctx, a.prompt_tokens + a.max_tokens + 16)
            llm = Llama(model_path=f"{a.gguf_dir}/{name}", n_threads=a.threads, n_threads_batch=a.threads,
                        n_ctx=n_ctx, n_batch=min(a.n_batch, n_ctx), verbose=False)
            models[name] = llm
        if n_prompt + n_gen > llm.n_ctx():
            print(json.dumps({"error": f"{n_prompt} + {n_gen} tokens exceed n_ctx {llm.n_ctx()} (--n-ctx)"}), flush=True)
            continue
        prompt = [1] + [100 + (i * 37) % 20000 for i in range(n_prompt - 1)]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = llm.sample(top_k=1, temp=0.0)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        for _ in range(n_gen - 1):
            llm.eval([tok])
            tok = llm.sample(top_k=1, temp=0.0)
        dt = time.perf_counter() - t0
        print(json.dumps({"gguf": name, "prompt_tokens": n_prompt, "prefill_ms": prefill_ms,
                          "decode_tok_s": (n_gen - 1) / dt if n_gen > 1 else 0.0}), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--extract", nargs=2, metavar=("LLAVA_DIR", "OUT_DIR"))
    p.add_argument("--serve", action="store_true")
    p.add_argument("--gguf-dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=229)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--n-ctx", type=int, default=0, help="context size (default: prompt + tokens + 16)")
    p.add_argument("--n-batch", type=int, default=2048, help="prompt tokens per llama_decode (llama-bench's default)")
    p.add_argument("--no-extra-bufts", action="store_true", help="weights as stored: no runtime repacking")
    a = p.parse_args()
    if a.extract:
        extract(*a.extract)
    elif a.serve:
        serve(a)
    else:
        p.error("--extract or --serve")


if __name__ == "__main__":
    main()
