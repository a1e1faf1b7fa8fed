"""Tokens and templates: everything about gpt-oss's tokenizer and prompts, in one package.

- ``vocabulary``: the o200k vocabulary (ranks, the Harmony specials, the tiny layout, byte-level
  text), and the types an artifact's reader fills in (``Vocabulary``, ``Embedded``);
- ``files``: the Hugging Face tokenizer files (``tokenizer.json`` parsed here and nowhere else,
  ``tokenizer_config.json``, ``generation_config.json``, the chat template), read and written;
- ``harmony``: openai-harmony offline, and what a chat means in Harmony;
- ``templates``: chat templates rendered as the runtimes render them, the chat corpus, and the
  comparison with Harmony.

A base package: it imports only the base modules (``errors``, ``model``), so formats, converters
and verify all use it.
"""
