"""The safetensors container: a validating memory-mapped reader and a streaming writer.

Format (https://github.com/huggingface/safetensors): ``u64 LE header_len``, ``header_len``
bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the data buffer. No key appears twice. Offsets are relative to the buffer, must not overlap, must cover it
exactly and must match ``prod(shape) * itemsize``.

Why not ``safetensors.numpy``: it has no bfloat16, copies every tensor into memory, and its
``save_file`` needs the whole state dict at once. We need zero-copy views of 13-65 GB files
and tensor-by-tensor writes, so this module implements the (short) spec itself and checks
every rule with an error that names the file and the tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import numpy as np

from ..dtypes import DTYPES, count_bf16_nonfinite
from ..errors import InputError
from ..reading import open_regular, read_json
from ..model import TensorSpec, iter_chunks
from .mxfp4 import count_nan_scales

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: ``file`` bytes ``[start, start + nbytes)``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute file offset of the first byte
    nbytes: int


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


PREFETCH_PIECE = 8 << 20  # bytes read per call when prefetching


class SafetensorsFile:
    """One ``.safetensors`` file, header parsed and checked, data memory-mapped read-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open_regular(self.path)  # a FIFO named like a shard would block an open
        self.file_size = os.fstat(self._fh.fileno()).st_size
        self.metadata, self.entries = self._parse_header()
        self._mmap: mmap.mmap | None = None
        self._mapping = threading.Lock()  # the source check reads beside the conversion: one mapping

    # -- header -------------------------------------------------------------------------

    def _fail(self, message: str, tensor: str | None = None) -> InputError:
        return InputError(message, file=self.path, tensor=tensor)

    def _parse_header(self) -> tuple[dict[str, str], dict[str, TensorEntry]]:
        if self.file_size < 8:
            raise self._fail(f"file is {self.file_size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", self._fh.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise self._fail(f"header length {header_len} exceeds {MAX_HEADER_BYTES} bytes (not a safetensors file?)")
        if 8 + header_len > self.file_size:
            raise self._fail(
                f"header claims {header_len} bytes but the file has only {self.file_size - 8} after the length "
                "(file truncated?)"
            )
        raw = self._fh.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"header is not valid JSON: {exc}") from exc
        except _DuplicateKey as exc:
            # JSON parsers keep the last (or the first) of two equal keys: which bytes a reader takes
            # would depend on the reader. The format forbids it.
            raise self._fail(f"the header names {exc.key!r} twice (the safetensors format forbids duplicate keys)",
                             exc.key) from None
        if not isinstance(header, dict):
            raise self._fail("header JSON must be an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ must map strings to strings")
        data_start = 8 + header_len
        buffer_len = self.file_size - data_start
        entries = {name: self._parse_entry(name, info, data_start) for name, info in header.items()}
        self._check_coverage(entries, data_start, buffer_len)
        return metadata, entries

    def _parse_entry(self, name: str, info: object, data_start: int) -> TensorEntry:
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise self._fail("header entry needs dtype, shape and data_offsets", name)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise self._fail(f"unknown dtype {dtype!r}", name)
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._fail(f"shape must be a list of non-negative ints, got {shape!r}", name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise self._fail(f"data_offsets must be [begin, end], got {offsets!r}", name)
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end or end - begin != expected:
            raise self._fail(
                f"data_offsets {offsets} span {end - begin} bytes but {dtype}{shape} needs {expected}", name
            )
        return TensorEntry(name, dtype, tuple(shape), self.path, data_start + begin, end - begin)

    def _check_coverage(self, entries: dict[str, TensorEntry], data_start: int, buffer_len: int) -> None:
        position = data_start
        for entry in sorted(entries.values(), key=lambda e: (e.start, e.nbytes)):
            # Past the end first: offsets beyond the file also leave a gap, but this says why.
            if entry.start + entry.nbytes > self.file_size:
                raise self._fail(
                    f"data ends at byte {entry.start + entry.nbytes} but the file has {self.file_size} bytes "
                    "(file truncated, or data_offsets out of range?)",
                    entry.name,
                )
            if entry.start != position:
                what = "overlaps the previous tensor" if entry.start < position else "leaves a gap before it"
                raise self._fail(f"data starts at buffer offset {entry.start - data_start}, which {what}", entry.name)
            position += entry.nbytes
        if position != data_start + buffer_len:
            raise self._fail(f"{data_start + buffer_len - position} bytes after the last tensor are not described")

    # -- data ---------------------------------------------------------------------------

    def array(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of the tensor's raw data (BF16 as uint16 bits)."""
        entry = self.entries[name]
        with self._mapping:
            if self._mmap is None:
                if self.file_size == 0:
                    raise self._fail("empty file")
                self._mmap = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(
            self._mmap, dtype=DTYPES[entry.dtype], count=math.prod(entry.shape), offset=entry.start
        ).reshape(entry.shape)

    def stored_name(self, array: np.ndarray) -> str | None:
        """The tensor whose bytes ``array`` is, as ``array`` handed it out (same first byte, same
        size, contiguous), else ``None``: lets a caller that can read the file itself (MLX's
        ``mx.load``) take the same bytes, and never takes bytes an array was computed from."""
        if self._mmap is None or not array.flags.c_contiguous:
            return None
        at = array.__array_interface__["data"][0] - np.frombuffer(self._mmap, np.uint8, count=1).ctypes.data
        for name, entry in self.entries.items():
            if entry.start == at and entry.nbytes == array.nbytes and entry.nbytes > 0:
                return name
        return None

    def releaser(self, *names: str) -> Callable[[], None]:
        """A call that releases ``names`` (for a holder of views into them, e.g. a LoRA pair)."""
        def release() -> None:
            for name in names:
                self.release(name)

        return release

    def release(self, name: str, offset: int = 0, nbytes: int | None = None) -> None:
        """Drop the tensor's pages from this process's memory (they stay in the page cache).

        Touched pages of a file mapping count towards RSS until unmapped, so a converter that
        streams through a 65 GB file calls this after each tensor (or each ``offset, nbytes``
        piece of a large one) to keep its footprint flat.
        """
        if self._mmap is None:
            return
        entry = self.entries[name]
        first = entry.start + offset
        last = entry.start + (entry.nbytes if nbytes is None else min(offset + nbytes, entry.nbytes))
        page = mmap.PAGESIZE
        start = first // page * page
        end = min(-(-last // page) * page, self.file_size)
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def prefetch(self, name: str) -> None:
        """Read the tensor's bytes into the page cache, to be mapped later at memory speed (the
        runner's thread does this ahead of it, so the disk reads while a layer computes). The
        pages are the kernel's, not this process's: RSS is unchanged. ``os.pread`` leaves the GIL."""
        entry = self.entries[name]
        at, end = entry.start, entry.start + entry.nbytes
        while at < end:
            got = len(os.pread(self._fh.fileno(), min(PREFETCH_PIECE, end - at), at))
            if got == 0:
                return  # the file is shorter than its header says: the reader will say so
            at += got

    def close(self) -> None:
        # Views handed out keep the mmap alive through their base; only drop our handle.
        self._mmap = None
        self._fh.close()


INDEX_FILE = "model.safetensors.index.json"


def numbered_shard_names(count: int, separator: str = "-") -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` (1-based; the 120b
    ``original/`` folder uses a double dash: ``separator="--"``)."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model{separator}{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


@dataclass(frozen=True)
class FolderLayout:
    """The byte facts of a sharded safetensors folder format, which its ``formats/`` module
    declares and ``shards.write_folder`` follows: where the shards go, their names, when the
    index is written and how its JSON looks, and the safetensors ``__metadata__``."""

    shard_names: Callable[[int], list[str]] = numbered_shard_names
    subfolder: str = ""  # "original": the weights and their config in OUT/original/
    index_always: bool = False  # else only when there is more than one shard
    index_indent: int | None = 2
    index_newline: bool = True
    sort_weight_map: bool = False
    metadata: tuple[tuple[str, str], ...] = (("format", "pt"),)
    default_shard_size: int | None = 5 << 30  # --shard-size when not given (None: one file)
    index_metadata: Callable[[list[TensorSpec]], dict] | None = None  # keys beside total_size

    def index_text(self, specs: list[TensorSpec], weight_map: dict[str, str]) -> str:
        metadata = {"total_size": sum(spec.nbytes for spec in specs)}
        if self.index_metadata is not None:
            metadata.update(self.index_metadata(specs))
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items())) if self.sort_weight_map
                 else weight_map}
        return json.dumps(index, indent=self.index_indent) + ("\n" if self.index_newline else "")


class ShardedReader:
    """What every folder-of-safetensors reader shares: its JSON config, its shards opened and
    indexed by tensor name (a name in two shards is an error), byte totals, closing."""

    files: list[SafetensorsFile]
    entries: dict[str, TensorEntry]

    @staticmethod
    def _read_config(path: Path) -> dict:
        config = read_json(path)
        if not isinstance(config, dict):
            raise InputError("config must be a JSON object", file=path)
        return config

    def _check_index(self, folder: Path) -> None:
        """``model.safetensors.index.json``, where there is one, as transformers reads it to find
        each tensor: an object whose ``weight_map`` maps every tensor of the shards, and nothing
        else, to the file in this folder that holds it."""
        path = Path(folder) / INDEX_FILE
        if not (path.exists() or path.is_symlink()):
            return
        doc = read_json(path)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError("the index must be an object whose weight_map maps tensor names to file names", file=path)
        for name, file in weight_map.items():
            entry = self.entries.get(name)
            if entry is None:
                raise InputError(f"the index names a tensor no shard holds (it maps it to {file!r})", file=path,
                                 tensor=name)
            if file != entry.file.name:
                raise InputError(f"the index maps it to {file!r}, but {entry.file.name} holds it", file=path,
                                 tensor=name)
        unlisted = sorted(self.entries.keys() - weight_map.keys())
        if unlisted:
            raise InputError(f"the index leaves out {len(unlisted)} tensors of the shards (transformers would not "
                             "load them)", file=path, tensor=unlisted[0])

    def _open_shards(self, folder: Path, pattern: str) -> None:
        """Open every ``pattern`` file in ``folder`` and index their tensors into ``self.entries``."""
        paths = sorted(folder.glob(pattern))
        if not paths:
            raise InputError(f"no {pattern} files", file=folder)
        self.files = [SafetensorsFile(p) for p in paths]
        self.entries = {}
        for f in self.files:
            for name, entry in f.entries.items():
                if name in self.entries:
                    raise InputError(f"tensor is also in {self.entries[name].file.name}", file=f.path, tensor=name)
                self.entries[name] = entry

    def _stored(self, name: str) -> list[str]:
        """The tensors of the files that hold canonical ``name`` (each reader maps its own names)."""
        raise NotImplementedError

    def release(self, name: str) -> None:
        """Unmap the pages behind a canonical tensor once streamed (see ``SafetensorsFile.release``).

        Streaming code calls this after each tensor so peak RSS stays near one tensor, not the
        whole checkpoint."""
        for stored in self._stored(name):
            self._file(self.entries[stored]).release(stored)

    def prefetch(self, name: str) -> None:
        """Start reading a canonical tensor's bytes into the page cache (``SafetensorsFile.prefetch``)."""
        for stored in self._stored(name):
            self._file(self.entries[stored]).prefetch(stored)

    def stored_source(self, array: np.ndarray) -> tuple[Path, str] | None:
        """``(file, tensor)`` whose bytes ``array`` is verbatim (``SafetensorsFile.stored_name``)."""
        for f in self.files:
            name = f.stored_name(array)
            if name is not None:
                return f.path, name
        return None

    def _file(self, entry: TensorEntry) -> SafetensorsFile:
        for f in self.files:
            if f.path == entry.file:
                return f
        raise AssertionError(entry.file)

    def scan_values(self, is_e8m0: Callable[[str], bool], names: Iterable[str] | None = None,
                    progress: Callable[[int], None] | None = None) -> list[str]:
        """Problems naming file and tensor: NaN/Inf in the float tensors, scale byte 255 in those
        ``is_e8m0`` names (in ``names`` order, default the files'). Other tensors are not read;
        each read piece is unmapped at once, so RSS stays flat beside a conversion."""
        problems = []
        for name in self.entries if names is None else names:
            entry = self.entries[name]
            scale = is_e8m0(name)
            if scale or entry.dtype in ("BF16", "F16", "F32"):
                bad = self._count_invalid(entry, scale)
                if bad:
                    what = "scale bytes are 255 (NaN in E8M0)" if scale else "NaN/Inf values"
                    problems.append(f"file {entry.file}, tensor {name!r}: {bad} {what}")
            if progress is not None:
                progress(entry.nbytes)
        return problems

    def _count_invalid(self, entry: TensorEntry, scale: bool) -> int:
        file, offset, bad = self._file(entry), 0, 0
        for piece in iter_chunks(file.array(entry.name)):
            if scale:
                bad += count_nan_scales(piece)
            elif entry.dtype == "BF16":
                bad += count_bf16_nonfinite(piece)
            else:
                bad += int(np.count_nonzero(~np.isfinite(piece)))
            file.release(entry.name, offset, piece.nbytes)
            offset += piece.nbytes
        return bad

    @property
    def tensor_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def summary(self, scan: bool) -> dict:
        """What ``inspect`` shows of every sharded folder (its format adds its own keys), and the
        problems ``scan()`` finds when ``scan``."""
        problems = self.scan() if scan else []
        return {"path": str(self.path), "valid": not problems, "problems": problems, "config": self.config.to_dict(),
                "files": [f.path.name for f in self.files], "tensor_count": len(self.entries),
                "tensor_bytes": self.tensor_bytes, "bytes_by_dtype": self.bytes_by_dtype()}

    def bytes_by_dtype(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for e in self.entries.values():
            totals[e.dtype] = totals.get(e.dtype, 0) + e.nbytes
        return dict(sorted(totals.items()))  # stable order in inspect --json

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_header(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out in the given order.

    The JSON is padded with spaces so the data starts 8-byte aligned, as the reference
    writer does; keys keep the given order so the same input gives the same bytes.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Streams tensors into an open binary file in the order declared up front.

    Usage: ``w = SafetensorsWriter(fh, specs); w.write(name, array)`` for every spec in order
    (``array`` may be written in several ``write`` calls for the same name, as chunks).
    ``finish()`` checks that every byte promised by the header was written.
    """

    def __init__(self, fh: BinaryIO, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self._fh = fh
        self._specs = list(specs)
        self._index = 0
        self._written = 0  # bytes of the current tensor written so far
        fh.write(build_header(self._specs, metadata))

    def write(self, name: str, data: np.ndarray) -> None:
        spec = self._current(name)
        dtype = DTYPES[spec.dtype]
        if data.dtype.itemsize != dtype.itemsize or data.dtype.kind != dtype.kind:
            raise TypeError(f"{name}: got {data.dtype}, header says {spec.dtype}")
        if self._written == 0 and data.nbytes == spec.nbytes and tuple(data.shape) != spec.shape:
            raise ValueError(f"{name}: got shape {data.shape}, header says {spec.shape}")
        if self._written + data.nbytes > spec.nbytes:
            raise ValueError(f"{name}: {self._written + data.nbytes} bytes written, header says {spec.nbytes}")
        self._fh.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self._written += data.nbytes
        if self._written == spec.nbytes:
            self._index += 1
            self._written = 0

    def _current(self, name: str) -> TensorSpec:
        if self._index >= len(self._specs):
            raise ValueError(f"{name}: all declared tensors are already written")
        spec = self._specs[self._index]
        if spec.name != name:
            raise ValueError(f"expected tensor {spec.name!r} next, got {name!r}")
        return spec

    def finish(self) -> None:
        if self._index != len(self._specs):
            raise ValueError(f"only {self._index} of {len(self._specs)} tensors were written")
