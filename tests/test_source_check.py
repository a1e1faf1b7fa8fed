"""The source check beside the conversion (``oss_convert/source_check.py``): the source hashes
equal hashlib's, a bad value fails the check, the conversion's progress then stops the job,
the wait for the rest shows its own bar, and closing cancels it."""

from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import CancelledError, wait
from pathlib import Path

import pytest

from oss_convert.errors import InputError
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.progress import SILENT, Progress
from oss_convert.source_check import SourceCheck


class Recorder(Progress):
    def __init__(self):
        self.tasks, self.advanced = [], 0

    def start(self, description, total, unit):
        self.tasks.append((description, total))

    def advance(self, amount):
        self.advanced += amount


def source_files(ckpt: OriginalCheckpoint) -> list[Path]:
    return [f.path for f in ckpt.files] + [ckpt.config_path]


def plant_nan(repo: Path) -> str:
    """A BF16 NaN in the first value of the embedding; returns its file name."""
    with OriginalCheckpoint(repo) as ckpt:
        entry = ckpt.entries["embedding.weight"]
    data = bytearray(entry.file.read_bytes())
    data[entry.start:entry.start + 2] = b"\xc0\x7f"
    entry.file.write_bytes(bytes(data))
    return entry.file.name


def test_hashes_equal_hashlib_and_the_wait_shows_a_bar(tiny_repo):
    with OriginalCheckpoint(tiny_repo) as ckpt:
        files = source_files(ckpt)
        with SourceCheck(ckpt, scan=True, files=files) as check:
            progress = Recorder()
            hashes = check.result(progress)
            total = check.total
    assert hashes == {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                      for p in files}
    assert total == ckpt.tensor_bytes + sum(p.stat().st_size for p in files)
    # Either the check was done before result() (no bar) or its bar counted every byte.
    assert progress.tasks in ([], [("check source", total)])
    assert progress.advanced in (0, total)


def test_a_bad_value_fails_the_check_and_stops_the_conversion(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    name = plant_nan(repo)
    with OriginalCheckpoint(repo) as ckpt, SourceCheck(ckpt, scan=True, files=source_files(ckpt)) as check:
        watched = check.watch(SILENT)
        wait([check._future])
        with pytest.raises(InputError, match="NaN/Inf") as raised:
            watched.advance(1)  # the conversion's next step
        assert name in str(raised.value) and "embedding.weight" in str(raised.value)
        with pytest.raises(InputError):
            check.result(SILENT)  # nothing is published


def test_without_scan_or_files_there_is_nothing_to_wait_for(tiny_repo):
    with OriginalCheckpoint(tiny_repo) as ckpt, SourceCheck(ckpt, scan=False, files=[]) as check:
        assert check.total == 0
        assert check.result(SILENT) == {}


def test_closing_cancels_the_reading(tiny_repo):
    """An interrupted conversion does not wait for the source to be read to the end."""
    with OriginalCheckpoint(tiny_repo) as ckpt:
        check = SourceCheck(ckpt, scan=True, files=source_files(ckpt) * 200)
        check.close()
        future = check._future
        assert future.done()
        assert future.cancelled() or isinstance(future.exception(), CancelledError)  # stopped, not finished
