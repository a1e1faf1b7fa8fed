#!/usr/bin/env bash
# The main job on the bundled example: a trained tiny gpt-oss in the real original/ layout
# (examples/gpt-oss-tiny, made by scripts/train_tiny.py), converted to MLX and GGUF, each
# verified against the BF16 reference on held-out text, then all compared in one table.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model="$here/gpt-oss-tiny"
work=${1:-example}
mkdir -p "$work"
text=(--text "$model/heldout.txt" --ctx 512 --chunks 16)
oss-convert inspect "$model"
oss-convert convert "$model" --to mlx -o "$work/gpt-oss-tiny-mlx" --force --quiet
oss-convert convert "$model" --to mlx -o "$work/gpt-oss-tiny-mlx-q4" --recipe mxfp4-q4 --force --quiet
oss-convert convert "$model" --to gguf -o "$work/gpt-oss-tiny.gguf" --force --quiet
oss-convert convert "$model" --to gguf -o "$work/gpt-oss-tiny-q8_0.gguf" --outtype q8_0 --force --quiet
oss-convert reference "$model" -o "$work/reference.npz" "${text[@]}" --force --quiet
oss-convert verify "$work/gpt-oss-tiny-mlx" --reference "$work/reference.npz" "${text[@]}" --quiet
oss-convert verify "$work/gpt-oss-tiny.gguf" --reference "$work/reference.npz" "${text[@]}" --quiet
# Every artifact in one table, by size (exits 1 if one fails the gates: the 4-bit one may).
oss-convert compare --reference "$work/reference.npz" "${text[@]}" --quiet --csv "$work/compare.csv" \
    "$work/gpt-oss-tiny-mlx" "$work/gpt-oss-tiny-mlx-q4" "$work/gpt-oss-tiny.gguf" "$work/gpt-oss-tiny-q8_0.gguf" || true
