#!/usr/bin/env bash
# llama.cpp, the CPU engine `vlm-mesh bench quantized` compares with, on the same decoder:
#   scripts/setup_llama_cpp.sh MODEL_DIR OUT_DIR [VENV]
# 1. a virtualenv (default target/llama-venv) with llama-cpp-python built from source (cmake, the
#    machine's own instruction set: GGML_NATIVE=ON; about 11 minutes on 2 cores);
# 2. MODEL_DIR's language model (llava-hf layout) as a plain LlamaForCausalLM directory;
# 3. converted to OUT_DIR/lm-f32.gguf by llama.cpp's own convert_hf_to_gguf.py (from the
#    llama-cpp-python source archive), then quantized with llama.cpp's quantizer to
#    lm-q8_0.gguf and lm-q4_k_m.gguf. LLAMA_OUTTYPE=f16 converts to lm-f16.gguf instead (a 7B
#    decoder: 13.5 GB rather than 27); the extracted directory is removed once converted.
# Needs a Python with torch, transformers and sentencepiece for the conversion (VLM_PYTHON, default
# ~/vlm-venv/bin/python). Not part of the test command.
set -euo pipefail
MODEL=$(realpath "$1"); OUT=$(realpath -m "$2"); VENV=${3:-target/llama-venv}
PY=${VLM_PYTHON:-$HOME/vlm-venv/bin/python}
VERSION=0.3.36
mkdir -p "$OUT"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    command -v cmake >/dev/null || "$VENV/bin/pip" install -q cmake ninja
    # Source build of llama-cpp-python only (a global --no-binary would compile cmake too).
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" PATH="$VENV/bin:$PATH" \
        "$VENV/bin/pip" install -q --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
fi
SRC="$OUT/src"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    mkdir -p "$SRC"
    # Only this package from source (--no-binary :all: would also build its build tools).
    "$VENV/bin/pip" download -q --no-deps --no-binary llama-cpp-python -d "$OUT/sdist" "llama-cpp-python==$VERSION"
    tar -xzf "$OUT"/sdist/llama_cpp_python-*.tar.gz -C "$SRC" --strip-components=1
fi
"$PY" "$(dirname "$0")/bench_llama_cpp.py" --extract "$MODEL" "$OUT/lm-hf"
# The bench tokenizer is synthetic: convert_hf_to_gguf.py does not recognise its pre-tokenizer
# by hash, and GPT-2's splits it the same way, so name that one.
OUTTYPE=${LLAMA_OUTTYPE:-f32}
PYTHONPATH="$SRC/vendor/llama.cpp/gguf-py:$SRC/vendor/llama.cpp" "$PY" - "$OUT" "$OUTTYPE" <<'PY'
import sys
out = sys.argv[1]
import importlib
import convert_hf_to_gguf as c
# The method lives on the base model class (convert_hf_to_gguf.py itself, or conversion/base.py
# in newer llama.cpp).
for mod in [c] + [importlib.import_module(m) for m in ("conversion.base",) if importlib.util.find_spec(m.split(".")[0])]:
    for cls in vars(mod).values():
        if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
            cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
outtype = sys.argv[2]
sys.argv = ["convert_hf_to_gguf.py", f"{out}/lm-hf", "--outtype", outtype, "--outfile", f"{out}/lm-{outtype}.gguf"]
c.main()
PY
rm -rf "$OUT/lm-hf"
"$VENV/bin/python" - "$OUT" "$OUTTYPE" <<'PY'
import ctypes, sys
import llama_cpp as l
out = sys.argv[1]
for name, ftype in (("q8_0", l.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_k_m", l.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
    p = l.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    rc = l.llama_model_quantize(f"{out}/lm-{sys.argv[2]}.gguf".encode(), f"{out}/lm-{name}.gguf".encode(), ctypes.byref(p))
    assert rc == 0, f"quantizing to {name} failed: {rc}"
    print(f"wrote {out}/lm-{name}.gguf")
PY
ls -l "$OUT"/*.gguf
