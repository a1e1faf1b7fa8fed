"""oss-convert: convert, quantize and verify OpenAI gpt-oss checkpoints."""

__version__ = "0.1.0"
