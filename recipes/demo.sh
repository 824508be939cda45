#!/usr/bin/env bash
# The main job: timm ResNet-18 trained from scratch with RigL-ITOP at 90 % sparsity on Fashion-MNIST,
# on the CPU (~6 minutes on 2 cores, with the sparse kernels of compute: auto). Sets up everything it
# needs: uv (from PyPI), the locked environment, and Debian's dataset-fashion-mnist package when the
# data are missing and apt exists.
# Extra arguments are config overrides, e.g. `bash recipes/demo.sh --train.epochs 1`.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv

DATA=/usr/share/datasets/fashion-mnist
if [ ! -e "$DATA/train-images-idx3-ubyte.gz" ] && [ ! -e "$DATA/train-images-idx3-ubyte" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "Fashion-MNIST not found in $DATA: installing Debian's dataset-fashion-mnist"
    $SUDO apt-get install -y dataset-fashion-mnist || { $SUDO apt-get update && $SUDO apt-get install -y dataset-fashion-mnist; }
  else
    echo "Fashion-MNIST IDX files not found in $DATA and apt-get is unavailable." >&2
    echo "Put train/t10k-{images-idx3,labels-idx1}-ubyte(.gz) there, or pass --data.data_dir <folder>." >&2
    exit 1
  fi
fi

exec python3 -m uv run --locked accelerate launch --num_processes 1 --num_machines 1 \
  --mixed_precision no --dynamo_backend no \
  recipes/train.py --config recipes/configs/fashion_mnist_rigl_itop.yaml --run.overwrite true "$@"
