#!/usr/bin/env bash
# Set up everything the README's commands need, idempotently (a second run takes seconds):
#   * Debian's dataset-fashion-mnist (the real data of the quickstart), when apt-get can be used;
#   * a virtual environment in .venv with the pinned torch/torchvision (served from this machine's disk,
#     a CUDA build that also runs on the CPU) and this package in editable mode with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
      || echo "setup: could not install dataset-fashion-mnist; the quickstart will need --data.init_args.download true" >&2
  else
    echo "setup: not root or no apt-get; install dataset-fashion-mnist yourself or pass --data.init_args.download true" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  .venv/bin/pip install -q "${TORCH_PINS[@]}"
fi
# Reinstall the package only when its metadata changed (the install is editable, so code changes need nothing).
stamp=.venv/.saal-lightning-installed
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
  .venv/bin/pip install -q "${TORCH_PINS[@]}" -e ".[dev]"
  cp pyproject.toml "$stamp"
fi
