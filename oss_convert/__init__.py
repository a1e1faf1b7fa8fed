"""oss-convert: convert, quantize and verify OpenAI gpt-oss checkpoints."""

__version__ = "0.1.0"

import os as _os

# MLX's CUDA backend multiplies float32 in TF32 unless told otherwise; the verifier must compute
# in full float32 wherever it runs (a lossless artifact showed mean KL 2.5e-3 on an H100 in
# TF32, 3e-11 without). MLX reads this when it starts, so it is set before anything imports it.
_os.environ.setdefault("MLX_ENABLE_TF32", "0")
