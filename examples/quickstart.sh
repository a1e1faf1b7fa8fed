#!/usr/bin/env bash
# The main job on a bundled example: make a small gpt-oss checkpoint in the real original/
# layout, convert it to MLX and GGUF, and verify each artifact against the BF16 reference.
set -euo pipefail
work=${1:-example}
oss-convert synth "$work/gpt-oss-tiny" --preset tiny --force
oss-convert inspect "$work/gpt-oss-tiny"
oss-convert convert "$work/gpt-oss-tiny" --to mlx -o "$work/gpt-oss-tiny-mlx" --force
oss-convert convert "$work/gpt-oss-tiny" --to gguf -o "$work/gpt-oss-tiny.gguf" --force
oss-convert reference "$work/gpt-oss-tiny" -o "$work/reference.npz" --force
oss-convert verify "$work/gpt-oss-tiny-mlx" --reference "$work/reference.npz"
oss-convert verify "$work/gpt-oss-tiny.gguf" --reference "$work/reference.npz"
