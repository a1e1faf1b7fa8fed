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
oss-convert compare --reference "$work/reference.npz" "${text[@]}" --quiet --csv "$work/compare.csv" --force \
    "$work/gpt-oss-tiny-mlx" "$work/gpt-oss-tiny-mlx-q4" "$work/gpt-oss-tiny.gguf" "$work/gpt-oss-tiny-q8_0.gguf" || true
# A fine-tune as most of them ship: a LoRA adapter, trained with PEFT on Sherlock Holmes
# (examples/gpt-oss-tiny-sherlock-lora, made by scripts/train_adapter.py). One step from base +
# adapter to a verified artifact: merged exactly, touched experts re-encoded to MXFP4, the rest copied.
lora="$here/gpt-oss-tiny-sherlock-lora"
story=(--text "$lora/heldout.txt" --ctx 512 --chunks 16)
oss-convert inspect "$lora"
oss-convert convert "$model" --adapter "$lora" --to mlx -o "$work/gpt-oss-tiny-sherlock-mlx" --force --quiet
# Against base + adapter applied exactly: the KL is only what re-encoding the touched experts cost
# (so the gates are MXFP4's, not a lossless copy's).
oss-convert verify "$work/gpt-oss-tiny-sherlock-mlx" --reference "$model" --adapter "$lora" "${story[@]}" \
    --max-kld 0.01 --min-top1 0.95 --quiet
# The perplexity gained on the adapter's own held-out text: the merged model against the base
# (a ratio far below 1; the table's verdict says "fail" because the fine-tune is meant to differ).
oss-convert compare --reference "$model" "${story[@]}" --quiet "$work/gpt-oss-tiny-sherlock-mlx" || true
