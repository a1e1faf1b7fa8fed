#!/usr/bin/env bash
# Install oss-convert with its test oracles, then run the whole test suite.
# The oracles are implementations this project did not write: OpenAI's gpt-oss wheel (torch
# reference model and Metal converter), llama.cpp (through llama-cpp-python; the first build
# takes 7-12 minutes, pip caches the wheel afterwards), mlx-lm, tiktoken/bpe-openai.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
# gpt-oss declares Python>=3.12 and heavy extras it does not need for the reference code.
python3 -m pip install --quiet --disable-pip-version-check --no-deps --ignore-requires-python "gpt-oss==0.0.9"
python3 -m pytest -q -p no:cacheprovider "$@"
