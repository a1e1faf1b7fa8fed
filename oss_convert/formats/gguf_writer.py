"""gguf-py as oss-convert uses it: every dependence on gguf-py's internals, in one file, so that a
gguf-py upgrade has one file to check.

- ``new_writer``: a ``GGUFWriter`` subclass whose shards go to the temporary paths we choose
  (``format_shard_names``), hashed as they are written (``open_output_file``, which sets
  ``WriterState`` as gguf-py's own does), and whose long str/int arrays (the tokens, their types,
  the merges) are packed in one numpy pass instead of item by item (``_pack_val``: the bytes are
  gguf-py's own, checked against it by the tests);
- ``LazyTensor``: what ``GGUFWriter.add_tensor`` / ``write_tensors_to_file`` use of an array
  (``shape``, ``dtype``, ``nbytes``, ``tofile``), producing its bytes only when written;
- ``special_vocab``: ``SpecialVocab`` shown a small ``tokenizer.json`` (it would parse the 27 MB
  file a second time);
- ``split_paths``: llama.cpp's split names (``SHARD_NAME_FORMAT``).
Imports: base modules, gguf-py (lazily: the CLI starts without it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .. import hashing


def gguf_py():
    import gguf  # imported lazily: the CLI should start without it

    return gguf


class LazyTensor:
    """What ``GGUFWriter.add_tensor`` needs of an array (shape, dtype, nbytes, ``tofile``),
    producing the bytes only when the writer reaches this tensor, a chunk at a time."""

    def __init__(self, shape: tuple[int, ...], dtype, chunks: Callable[[], Iterator[np.ndarray]],
                 computed: bool = False):
        self.shape = tuple(int(s) for s in shape)
        self.computed = computed  # chunks are new arrays (a repack, a quantization), not views of the source
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._chunks = chunks
        self.on_bytes: Callable[[int], None] = lambda n: None

    def tofile(self, fh) -> None:
        """Write the chunks. Computed ones (the MXFP4 repack, a quantization) are made one ahead
        while the current one is written: numpy and the write both release the GIL, so two
        cores overlap. Views of the source are written as they come: making the next one would
        unmap the pages still being written, which the write then maps again for good."""
        written = 0
        for chunk in (_one_ahead(self._chunks()) if self.computed else self._chunks()):
            chunk = np.ascontiguousarray(chunk)
            fh.write(memoryview(chunk).cast("B"))
            written += chunk.nbytes
            self.on_bytes(chunk.nbytes)
        if written != self.nbytes:
            raise AssertionError(f"produced {written} bytes, planned {self.nbytes}")


def _one_ahead(chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """The same chunks, each next one made on a worker thread while the caller uses this one."""
    chunks = iter(chunks)

    def make() -> np.ndarray | None:
        chunk = next(chunks, None)
        return None if chunk is None else np.ascontiguousarray(chunk)

    with ThreadPoolExecutor(1, thread_name_prefix="gguf-chunk") as pool:
        upcoming = pool.submit(make)
        while (chunk := upcoming.result()) is not None:
            upcoming = pool.submit(make)
            yield chunk


SPECIAL_VOCAB_FILE_BYTES = 8 << 20  # the files beside tokenizer.json that SpecialVocab may read are small


def special_vocab(root: Path, doc: dict):
    """gguf-py's ``SpecialVocab(root, load_merges=False)`` without its second parse of the 27 MB
    ``tokenizer.json`` (seconds before the first byte is written): it reads only ``added_tokens``
    and ``post_processor`` of it, so it is shown a folder with those two beside copies of the
    root's small files (its config, tokenizer config and templates; no link into the source)."""
    g = gguf_py()
    with tempfile.TemporaryDirectory(prefix="oss-convert-vocab-") as folder:
        view = Path(folder)
        for item in root.iterdir():
            if item.name == "tokenizer.json":
                continue
            if item.is_file() and item.stat().st_size <= SPECIAL_VOCAB_FILE_BYTES:
                shutil.copyfile(item, view / item.name)
            elif item.is_dir() and item.name == "additional_chat_templates":
                shutil.copytree(item, view / item.name)
        (view / "tokenizer.json").write_text(json.dumps(
            {key: doc[key] for key in ("added_tokens", "post_processor") if key in doc}), encoding="utf-8")
        return g.SpecialVocab(view, load_merges=False)


def new_writer(arch: str, split_max_size: int):
    """A GGUFWriter whose shards go to the paths we set in ``targets`` (temporary names, renamed
    by ``atomic_output`` once every shard is complete) instead of names derived from one path."""
    g = gguf_py()

    class Writer(g.GGUFWriter):
        targets: list[Path] = []

        def format_shard_names(self, path: Path) -> list[Path]:
            return list(self.targets)

        def open_output_file(self, path: Path | None = None) -> None:
            """gguf-py's, with each shard hashed as it is written (for the manifest)."""
            if self.state is g.WriterState.NO_FILE and path is not None:
                self.path = path
                self.fout = [hashing.HashingWriter(name) for name in self.format_shard_names(path)]
                self.state = g.WriterState.EMPTY
                return
            super().open_output_file(path)

        def _pack_val(self, val, vtype, add_vtype: bool, sub_type=None) -> bytes:
            packed = _pack_long_array(self, val, vtype, sub_type) if vtype == g.GGUFValueType.ARRAY else None
            if packed is None:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            return (self._pack("I", vtype) if add_vtype else b"") + packed

    return Writer(None, arch, split_max_size=split_max_size)


def _pack_long_array(writer, val, vtype, sub_type) -> bytes | None:
    """gguf-py's bytes for a long array of str or of int (the 201088 tokens, their types, the
    446k merges) in one pass, where gguf-py packs item by item (seconds on the real vocabulary);
    ``None`` for anything else, which gguf-py packs itself."""
    g = gguf_py()
    if not isinstance(val, list) or len(val) < 1024:
        return None
    order = ">" if writer.endianess == g.GGUFEndian.BIG else "<"
    head = lambda ltype: writer._pack("I", ltype) + writer._pack("Q", len(val))  # noqa: E731
    if all(type(v) is str for v in val) and sub_type in (None, g.GGUFValueType.STRING):
        return head(g.GGUFValueType.STRING) + _pack_strings(val, order)
    if all(type(v) is int for v in val) and sub_type in (None, g.GGUFValueType.INT32):
        if min(val) < -(2 ** 31) or max(val) >= 2 ** 31:
            return None  # gguf-py's own error
        return head(g.GGUFValueType.INT32) + np.asarray(val, dtype=order + "i4").tobytes()
    return None


def _pack_strings(strings: list[str], order: str) -> bytes:
    """Each string as its uint64 byte length then its UTF-8 bytes, placed with numpy: the
    lengths go to their 8-byte slots, the joined text to every byte in between."""
    encoded = [v.encode("utf-8") for v in strings]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    text = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    out = np.empty(8 * len(encoded) + text.size, dtype=np.uint8)
    starts = 8 * np.arange(len(encoded)) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    slots = (starts[:, None] + np.arange(8)).ravel()
    out[slots] = lengths.astype(order + "u8").view(np.uint8)
    is_text = np.ones(out.size, dtype=bool)
    is_text[slots] = False
    out[is_text] = text
    return out.tobytes()


def split_paths(out: Path, count: int) -> list[Path]:
    """llama.cpp's split naming (``model-00001-of-00003.gguf``); one file keeps ``out``."""
    if count == 1:
        return [out]
    from gguf.gguf_writer import SHARD_NAME_FORMAT

    return [out.with_name(SHARD_NAME_FORMAT.format(out.stem, i + 1, count)) for i in range(count)]
