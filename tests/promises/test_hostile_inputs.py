"""Promise: a downloaded artifact is hostile input. Every case of the hostile corpus
(``tests/hostile_corpus.py``: crafted inputs of every class, format and command) runs as its own
process and must end as asked: exit 2 for a bad input (exit 1 only where a verification ran and
failed), with one line on stderr naming the file (and the tensor, key or rule), no traceback,
within its time and memory bounds, nothing printed raw that could drive a terminal, the inputs
unchanged (hashed before and after) and nothing created outside the output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import hostile_corpus as corpus
from helpers import run_sub

CASES = {c.name: c for c in corpus.all_cases()}
RUNNER = Path(__file__).parent.parent / "hostile_runner.py"
ADDRESS_SPACE = 8 << 30  # each job's hard limit (the asserted bound, on its resident peak, is the case's)


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a regular file by its hash, anything else (a FIFO, a link,
    a folder) by its kind; never opening what is not a regular file."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "other"
    return out


def outside_output(tree: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tree.items() if not k.startswith("out")}


@pytest.fixture(scope="module")
def bases(tiny_repo, tiny_gguf, metal_bin, tmp_path_factory) -> dict[str, Path]:
    """The valid artifacts every case starts from (``hf``: the Hub's MXFP4 layout, with its index)."""
    folder = tmp_path_factory.mktemp("hostile-bases")
    mlx, hf = folder / "mlx", folder / "hf"
    ref = folder / "ref.npz"
    report = folder / "report.json"
    for args in (("convert", str(tiny_repo), "--to", "mlx", "-o", str(mlx), "--quiet"),
                 ("convert", str(tiny_repo), "--to", "hf", "-o", str(hf), "--quiet"),
                 ("reference", str(tiny_repo), "-o", str(ref), "--quiet", "--chunks", "2"),
                 ("verify", str(mlx), "--reference", str(ref), "--quiet", "--json", str(report))):
        done = run_sub(*args)
        assert done.returncode == 0, (args, done.stderr)
    return {"repo": tiny_repo, "gguf": tiny_gguf, "mlx": mlx, "hf": hf, "ref": ref, "report": report,
            "metal": metal_bin}


def prepare(case: corpus.Case, bases: dict[str, Path], work: Path) -> dict:
    work.mkdir()
    for base in case.uses():
        dest = work / corpus.BASE_NAMES[base]
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if bases[base].is_dir() else shutil.copyfile)(bases[base], dest)
    case.edit(work)
    return {"args": case.command(work), "cwd": str(work), "seconds": case.seconds, "memory": ADDRESS_SPACE}


@pytest.fixture(scope="module")
def outcomes(bases, tmp_path_factory) -> dict[str, dict]:
    """Every case run (one process each, forked from one that imported the command line once),
    with its tree before and after."""
    root = tmp_path_factory.mktemp("hostile")
    jobs, before = [], {}
    for i, case in enumerate(CASES.values()):
        work = root / f"{i:03d}"
        jobs.append(prepare(case, bases, work))
        before[case.name] = snapshot(work)
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), *sys.path])}
    done = subprocess.run([sys.executable, str(RUNNER), str(root / "jobs.json"), str(root / "results.json")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((root / "results.json").read_text())
    out = {}
    for (name, case), job, result in zip(CASES.items(), jobs, results):
        work = Path(job["cwd"])
        out[name] = {**result, "before": before[name], "after": snapshot(work), "work": str(work)}
        if case.klass == "values" and "metal" in case.uses():
            shutil.rmtree(work / "metal")  # 160 MB each: not kept to the end of the module
    return out


def test_the_corpus_covers_every_class_and_command():
    classes = {c.klass for c in CASES.values()}
    assert classes == {"structure", "sizes", "values", "placement", "templates", "filesystem", "side-files",
                       "output", "terminal"}
    commands = {c.args[0] for c in CASES.values()}
    assert commands == {"inspect", "verify", "compare", "convert", "reference", "card"}
    formats = {base for c in CASES.values() for base in c.uses()}
    assert formats == set(corpus.BASES)
    assert len(CASES) >= 200


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name, outcomes):
    case, got = CASES[name], outcomes[name]
    err, out = got["stderr"], got["stdout"]
    where = f"{name}: exit {got['rc']}\n{err[-1500:]}"
    assert got["rc"] in case.exits, where
    assert "Traceback" not in err and "Traceback" not in out, where
    assert "\x1b" not in err and "\x1b" not in out, where  # what came from a file is printed escaped
    if got["rc"] == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), where
        for part in case.names:
            assert part in lines[0], (part, where)
    elif case.names:  # a verification that ran and failed, or a report printed: it says so on stdout
        for part in case.names:
            assert part in out, (part, where)
    assert got["seconds"] < case.seconds, where
    assert got["max_rss"] < case.memory, (got["max_rss"] >> 20, where)
    # the inputs unchanged, nothing created outside the output
    assert outside_output(got["after"]) == outside_output(got["before"]), where
