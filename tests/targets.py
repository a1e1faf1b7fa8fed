"""Test cases for every registered target, derived from the registry (``converters.TARGETS``):
a new target is held to every promise (tests/promises/) by being registered.

Each ``Case`` is one ``oss-convert convert`` job: the target, its extra options, the fixture that
provides a suitable source, and the output's name. ``cases()`` gives one per target; with
``variants=True`` also one per recipe, per ``--outtype`` and a split where the target splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from oss_convert import converters, quantize


@dataclass(frozen=True)
class Case:
    name: str
    target: str
    options: tuple[str, ...]
    source: str  # the fixture holding a source this target accepts
    output: str  # the name given to -o

    def args(self, source, out, *more: str) -> list[str]:
        return ["convert", str(source), "--to", self.target, "-o", str(out), "--quiet", *self.options, *more]


def output_name(target: converters.Target) -> str:
    return f"model{target.file_suffix}" if target.file_suffix else "model"


def source_fixture(target: converters.Target, recipe: str | None = None) -> str:
    if target.full_vocabulary:
        return "metal_repo"
    if recipe in quantize.RECIPES:  # BF16 -> MXFP4 recipes do real work only on dense experts
        return "dense_repo"
    return "tiny_repo"


def cases(*, variants: bool = False) -> list[Case]:
    out = []
    for t in converters.TARGETS.values():
        out.append(Case(t.name, t.name, (), source_fixture(t), output_name(t)))
        if not variants:
            continue
        for recipe in t.recipes:
            out.append(Case(f"{t.name}-{recipe}", t.name, ("--recipe", recipe), source_fixture(t, recipe), output_name(t)))
        for outtype in t.outtypes:
            if outtype != "bf16":
                out.append(Case(f"{t.name}-{outtype}", t.name, ("--outtype", outtype), source_fixture(t), output_name(t)))
        if "split_max_size" in t.options:
            out.append(Case(f"{t.name}-split", t.name, ("--split-max-size", "1M"), source_fixture(t), output_name(t)))
        elif "shard_size" in t.options:
            out.append(Case(f"{t.name}-shards", t.name, ("--shard-size", "1M"), source_fixture(t), output_name(t)))
    return out


def params(*, variants: bool = False) -> list:
    return [pytest.param(case, id=case.name) for case in cases(variants=variants)]
