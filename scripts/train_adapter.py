#!/usr/bin/env python3
"""Train the bundled LoRA adapter (examples/gpt-oss-tiny-sherlock-lora) with PEFT, on the CPU.

    python scripts/train_adapter.py --text sherlock.txt --out examples/gpt-oss-tiny-sherlock-lora

The base is the bundled tiny gpt-oss (examples/gpt-oss-tiny, trained on the King James Bible),
opened in transformers' ``GptOssForCausalLM`` from oss-convert's own ``--to hf-bf16`` output.
PEFT adapts what gpt-oss fine-tunes adapt (the OpenAI cookbook's recipe, shrunk): attention
``q/k/v/o_proj`` of every layer, and the 3-D experts (``gate_up_proj`` and ``down_proj``,
through ``target_parameters``) of layers 1 and 3 only, so a merge has touched and untouched
layers. Text: *The Adventures of Sherlock Holmes* (public domain; Project Gutenberg's header
and licence text removed), its last 5% held out (written as ``heldout.txt``). Trained in
float32 with AdamW; saved with PEFT's ``save_pretrained``. Prints the held-out perplexity of
the base and of base + adapter (PEFT applied) and writes them to ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "examples" / "gpt-oss-tiny"
SEQ = 128
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGET_PARAMETERS = [f"{n}.mlp.experts.{p}" for n in (1, 3) for p in ("gate_up_proj", "down_proj")]


def tokens_of(text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    return np.array(Tokenizer.from_file(str(BASE / "tokenizer.json")).encode(text).ids, dtype=np.int64)


def perplexity(model, ids: np.ndarray) -> float:
    losses = []
    with torch.inference_mode():
        for start in range(0, len(ids) - SEQ, SEQ):
            x = torch.as_tensor(ids[start:start + SEQ + 1])[None]
            losses.append(_nll(model(x[:, :-1]).logits, x[:, 1:]))
    return math.exp(float(np.mean(losses)))


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[0].float(), targets[0]).item()


def main() -> None:
    import peft
    import transformers

    from oss_convert import converters

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    text = args.text.read_text(encoding="utf-8")
    cut = int(len(text) * 0.95)
    cut = text.index("\n\n", cut) + 2 if "\n\n" in text[cut:] else cut
    train_ids, heldout_ids = tokens_of(text[:cut]), tokens_of(text[cut:])
    with tempfile.TemporaryDirectory() as tmp:
        converters.convert(BASE, "hf-bf16", Path(tmp) / "hf")
        model = transformers.GptOssForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32,
                                                               attn_implementation="eager")
    base_ppl = perplexity(model, heldout_ids)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES,
                             target_parameters=TARGET_PARAMETERS)
    model = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        starts = rng.integers(0, len(train_ids) - SEQ - 1, size=args.batch)
        batch = torch.as_tensor(np.stack([train_ids[s:s + SEQ + 1] for s in starts]))
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    adapted_ppl = perplexity(model, heldout_ids)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    (args.out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    config_path = args.out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "examples/gpt-oss-tiny"  # not the temporary folder it was loaded from
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (args.out / "heldout.txt").write_text(text[cut:], encoding="utf-8")
    record = {"base": "examples/gpt-oss-tiny", "text": "The Adventures of Sherlock Holmes (Project Gutenberg #1661, "
              "public domain), licence header and footer removed; last 5% held out",
              "target_modules": TARGET_MODULES, "target_parameters": TARGET_PARAMETERS, "r": 8, "lora_alpha": 16,
              "steps": args.steps, "batch": args.batch, "seq": SEQ, "lr": args.lr, "seed": args.seed,
              "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(heldout_ids)),
              "heldout_ppl_base": round(base_ppl, 3), "heldout_ppl_adapted": round(adapted_ppl, 3),
              "peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"held-out perplexity: base {base_ppl:.2f}, base + adapter {adapted_ppl:.2f}")


if __name__ == "__main__":
    main()
