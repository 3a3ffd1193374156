#!/usr/bin/env bash
# The packages a GPU machine without a package registry lacks, in one bundle to take along (about 22 MB): Unsloth and
# unsloth_zoo, TRL, datasets and their small dependencies, bitsandbytes cut down to its CUDA library.  Built where a
# registry can be reached, for the GPU machine's Python ($PYTHON_VERSION, default 3.12) and CUDA ($CUDA, default 130);
# it leaves out torch, transformers, peft and accelerate, which that machine must have.  scripts/gpu_check.sh unpacks
# it ($PACKAGES) where Unsloth is not installed.
#
#     bash scripts/gpu_packages.sh [DEST]        (default .gpu, which git ignores: writes DEST/bundle.tgz)
set -euo pipefail
dest=${1:-.gpu}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--python-version "${PYTHON_VERSION:-3.12}" --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)
pkgs=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.14.2 datasets==4.8.5 dill multiprocess tyro docstring-parser
      shtab typeguard cut_cross_entropy torchao msgspec hf_transfer bitsandbytes==0.50.2 diffusers)
pip download --no-deps -q -d "$work/wheels" "${plat[@]}" "${pkgs[@]}"
pip install --no-deps -q --no-index --find-links "$work/wheels" --target "$work/site" "${plat[@]}" "$work"/wheels/*.whl
cd "$work/site"
rm -rf studio test unsloth_cli
find bitsandbytes -name 'libbitsandbytes_*.so' ! -name "*cuda${CUDA:-130}*" ! -name '*cpu*' -delete
find . -name __pycache__ -type d -prune -exec rm -rf {} +
cd "$work"
tar czf "$dest/bundle.tgz" site
ls -la "$dest/bundle.tgz"
