"""A base model with a LoRA adapter merged in, as every converter and the verifier read models.

Two views of base + adapter, both streaming (one tensor, or one expert, at a time):

- ``MergedSource`` is a ``model.Source`` for ``convert --adapter``: every BF16 tensor the adapter
  touches is ``W + delta`` computed in float32 and rounded to BF16 once; an expert it touches is
  decoded exactly, merged and re-encoded to MXFP4 with the recipe (``search`` unless ``ocp`` is
  asked for), experts it does not touch (or whose delta is exactly zero) are the base's bytes. A
  target that writes dense experts (``hf-bf16``) gets the merged experts rounded to BF16 instead,
  never through MXFP4. What changed is tallied per tensor (``MergedSource.report``) for the
  manifest and ``OUT/quantization.json``.
- ``AdaptedModel`` is a ``model.CanonicalModel`` for ``verify --adapter`` and ``reference
  --adapter``: the exact merge in float32 (base weights as they are + the deltas), so a merged
  artifact's KL measures only what its storage lost.

Support module: imports base modules, ``formats`` and ``quantize``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
import threading
import warnings
from concurrent.futures import BrokenExecutor, CancelledError, Future, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import encode_workers, quantize
from .dtypes import bf16_to_f32, f32_to_bf16
from .errors import OssConvertError
from .formats import mxfp4
from .hashing import file_sha256
from .lora import Adapter, delta_rows
from .model import Mxfp4Pair, expected_tensors, expert_name, is_expert_weight, iter_chunks

REPORT_KEY = "adapter_merge"  # its section in OUT/quantization.json and in the manifest
# On worker processes, the re-encoded experts the workers may hold ready (in temporary files)
# ahead of the target: layers of them, at least the next adapted one. 4 GiB lets the workers start
# on a 20b adapter's layers while the target still writes the unadapted ones before them (10 layers
# ahead; 1 GiB, two layers, kept them waiting: a full 20b merge 2.01-2.10x `cp -r` on 16 cores,
# 1.77-1.95x with 4 GiB, 8 GiB no better; bench/RESULTS.md).
SPILL_AHEAD_BYTES = 4 << 30
# ... and at most this share of the machine's memory: the temporary folder may be RAM-backed (tmpfs),
# and a file read back within seconds is in the page cache anyway
SPILL_MEMORY_SHARE = 16
SPILL_MARGIN_BYTES = 256 << 20  # left free in the temporary folder beside the spill


class LazyExperts:
    """A read-only ``[E, ...]`` array whose experts are made on demand, one at a time: what the
    converters index (``x[e]``, ``x[e, rows]``, ``x[a:b]``) and ``np.asarray`` materialises."""

    def __init__(self, shape: tuple[int, ...], dtype, expert: Callable[[int], np.ndarray]):
        self.shape, self.dtype, self._expert = tuple(shape), np.dtype(dtype), expert
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        if isinstance(index, (int, np.integer)):
            e = int(index) + (self.shape[0] if index < 0 else 0)
            if not 0 <= e < self.shape[0]:
                raise IndexError(f"expert {index} of {self.shape[0]}")
            one = self._expert(e)
            return one[rest] if rest else one
        if isinstance(index, slice):  # one expert at a time: each is dropped as the next is made
            experts = range(*index.indices(self.shape[0]))
            out = None
            for i, e in enumerate(experts):
                one = self[(e, *rest)]
                if out is None:
                    out = np.empty((len(experts), *one.shape), dtype=one.dtype)
                out[i] = one
            return out if out is not None else np.empty((0, *self.shape[1:]), dtype=self.dtype)[(slice(None), *rest)]
        raise TypeError(f"LazyExperts takes an expert, a slice or a tuple, not {index!r}")

    def __array__(self, dtype=None, copy=None):
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


class _MergeTally:
    """What the merge of one expert weight changed, kept for the report after its merge is gone."""

    def __init__(self, recipe: str):
        self.recipe = recipe
        self.error = quantize.ErrorTally()
        self.delta_energy = 0.0
        self.base_energy = 0.0
        self.reencoded: set[int] = set()

    def add(self, e: int, energies: tuple[float, float], error: quantize.ErrorTally) -> None:
        """``energies``: the sums of squares of expert ``e``'s delta and of its base weight;
        ``error``: its re-encoding's."""
        if e in self.reencoded:  # a target may ask for an expert twice: count it once
            return
        self.reencoded.add(e)
        self.error.merge(error)
        self.delta_energy += energies[0]
        self.base_energy += energies[1]

    def record(self) -> dict:
        return {"reencoded_experts": sorted(self.reencoded), "recipe": self.recipe,
                "delta_relative_norm": _relative(self.delta_energy, self.base_energy),
                "mxfp4_relative_mse": self.error.relative_mse}


class _ExpertMerge:
    """One expert weight (``block.N.mlp.mlp1_weight`` or ``mlp2``) of an MXFP4 base with its deltas.

    Each touched expert is encoded once and its blocks and scales go to a temporary file, which
    the target reads through a mapping: a target may read a weight more than once (MLX's gate
    rows, then its up rows), and a 120b layer's are a GB. With worker processes every touched
    expert is sent to them at once (``schedule``) and lands in that file in the background; on
    threads each is merged when first asked for."""

    def __init__(self, base: Mxfp4Pair, adapter: Adapter, name: str, recipe: str, tally: _MergeTally,
                 release: Callable[[], None], workers: "encode_workers.MergeWorkers | None" = None):
        self.base, self.adapter, self.name, self.recipe, self.tally = base, adapter, name, recipe, tally
        self._release, self._workers = release, workers
        E, rows, groups, _ = base.blocks.shape
        self.shape = (E, rows, groups * mxfp4.BLOCK)
        self.touched = adapter.touched_experts(name, E)
        self._blocks_bytes = rows * groups * (mxfp4.BLOCK // 2)
        self._expert_bytes = self._blocks_bytes + rows * groups  # its blocks, then its scales
        self._spill = tempfile.TemporaryFile(prefix="oss-convert-merge-")
        self._spill.truncate(E * self._expert_bytes)  # sparse until written; mapped whole for reading
        self._map = mmap.mmap(self._spill.fileno(), E * self._expert_bytes, access=mmap.ACCESS_READ)
        self._mapped: int | None = None  # the expert whose pages a target was last handed
        self._spilled: set[int] = set()  # on threads: the experts encoded so far
        self._ready: dict[int, Future] | None = None  # on workers: each touched expert's, once scheduled
        self._scratch = threading.local()  # on threads: each thread's delta rows
        self.blocks = LazyExperts(base.blocks.shape, np.uint8, lambda e: self.part(e, "blocks"))
        self.scales = LazyExperts(base.scales.shape, np.uint8, lambda e: self.part(e, "scales"))

    def schedule(self) -> None:
        """Send every touched expert to the workers, in order (nothing to do on threads)."""
        if self._workers is None or self._ready is not None:
            return
        search = self.recipe == "search"
        self._ready = {e: self._workers.submit(partial(self._load, e), self.shape[1:], search, partial(self._deliver, e))
                       for e in self.touched}

    def part(self, e: int, which: str) -> np.ndarray:
        """Expert ``e``'s blocks or scales; a touched expert's a read-only view of the file's
        mapping (a target reads the blocks and the scales apart, MLX each twice: the gate rows,
        then the up rows; reading a copy of each cost the main thread 2 s of a 20b merge, with
        the encoding left out). The previous expert's pages are dropped from this process as
        the next is handed out."""
        if e not in self.touched:
            return self.base.blocks[e] if which == "blocks" else self.base.scales[e]
        self._wait_spilled(e)
        if self._mapped not in (None, e):
            self._drop_pages(self._mapped)
        self._mapped = e
        offset, size, shape = (0, self._blocks_bytes, self.base.blocks.shape[1:]) if which == "blocks" else \
            (self._blocks_bytes, self._expert_bytes - self._blocks_bytes, self.base.scales.shape[1:])
        return np.frombuffer(self._map, np.uint8, size, e * self._expert_bytes + offset).reshape(shape)

    def _drop_pages(self, e: int) -> None:
        """Unmap expert ``e``'s pages from this process (they stay in the file; a view still held
        reads them back): touched pages of a mapping count in its memory until dropped."""
        start = e * self._expert_bytes // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, (e + 1) * self._expert_bytes - start)

    def _wait_spilled(self, e: int) -> None:
        if self._workers is not None:
            self.schedule()
            self._ready[e].result()
        elif e not in self._spilled:
            self._write_spill(e, *self._merged(e))
            self._spilled.add(e)
            self._release()
            if e == self.touched[-1]:
                self.adapter.release(self.name)

    def _write_spill(self, e: int, blocks: np.ndarray, scales: np.ndarray) -> None:
        try:
            for offset, array in ((0, blocks), (self._blocks_bytes, scales)):  # no bytes copy of either
                os.pwrite(self._spill.fileno(), memoryview(np.ascontiguousarray(array).reshape(-1)),
                          e * self._expert_bytes + offset)
        except OSError as error:  # not the output's disk: say which one (a tmpfs /tmp is RAM-sized)
            raise OssConvertError(f"cannot write the merge's temporary file in {tempfile.gettempdir()} (TMPDIR): "
                                  f"{error.strerror}; nothing was left behind") from error

    def _merged(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """On threads: expert ``e`` decoded, merged and re-encoded a chunk of rows at a time on the
        encoder's threads, each chunk's delta made and its energies summed while in cache."""
        blocks, scales = self.base.blocks[e], self.base.scales[e]
        terms = self.adapter.terms(self.name, e)
        energies: dict[int, tuple[float, float]] = {}

        def merged_rows(rows: slice, out: np.ndarray) -> np.ndarray:
            change = delta_rows(terms, rows.start, rows.stop, _thread_rows(self._scratch, out.shape))
            weight, energies[rows.start] = encode_workers.merged_piece(blocks[rows], scales[rows], change, out)
            return weight

        error = quantize.ErrorTally()
        with encode_workers.one_blas_thread():
            encoded = quantize.encode_made(self.shape[1:], merged_rows, self.recipe == "search", error)
        in_order = [energies[start] for start in sorted(energies)]  # one order, whatever the threads did
        if not any(s[0] for s in in_order):  # the delta is exactly zero: the base's bytes
            return self.base.blocks[e], self.base.scales[e]
        self.tally.add(e, (sum(s[0] for s in in_order), sum(s[1] for s in in_order)), error)
        return encoded

    # -- on the workers' feeder thread ----------------------------------------------------

    def _load(self, e: int, views: "encode_workers.Views") -> list:
        np.copyto(views.base_blocks, self.base.blocks[e])
        np.copyto(views.base_scales, self.base.scales[e])
        self._release()
        return self.adapter.terms(self.name, e)

    def _deliver(self, e: int, views: "encode_workers.Views", sums: list) -> None:
        """Expert ``e``'s result (the base's bytes where its delta came out exactly zero) into the
        file, its sums into the tally."""
        if e == self.touched[-1]:  # PEFT's B is rank-major: every expert reads all of its pages
            self.adapter.release(self.name)
        if not any(s[2] for s in sums):
            self._write_spill(e, views.base_blocks, views.base_scales)
            return
        self._write_spill(e, views.blocks, views.scales)
        chunks = np.array(sums)  # summed as the threads' path sums its chunks
        error = quantize.ErrorTally()
        error.add_sums(float(chunks[:, 0].sum()), float(chunks[:, 1].sum()), int(np.prod(self.shape[1:])))
        self.tally.add(e, (sum(s[2] for s in sums), sum(s[3] for s in sums)), error)

    def close(self) -> None:
        if self._ready:  # what was not started is dropped; what was is written before the file goes
            for future in self._ready.values():
                future.cancel()
            wait(list(self._ready.values()))
        self.adapter.release(self.name)
        try:
            self._map.close()
        except BufferError:  # a target still holds a view: unmapped when it is freed
            pass
        self._spill.close()


def _thread_rows(scratch: threading.local, shape: tuple[int, int]) -> np.ndarray:
    """The calling thread's float32 scratch rows of ``shape`` (kept for its next chunk: a fresh
    array's page faults cost about as much as the chunk's arithmetic)."""
    buffer = getattr(scratch, "rows", None)
    if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1] != shape[1]:
        buffer = scratch.rows = np.empty(shape, dtype=np.float32)
    return buffer[:shape[0]]


def _relative(delta_energy: float, base_energy: float) -> float:
    return float(np.sqrt(delta_energy / base_energy)) if base_energy else 0.0


def _spill_window() -> int:
    """The bytes of re-encoded experts the workers may hold ahead of the target: ``SPILL_AHEAD_BYTES``,
    or ``1/SPILL_MEMORY_SHARE`` of the physical memory where that is less."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the window as it is
        return SPILL_AHEAD_BYTES
    return min(SPILL_AHEAD_BYTES, memory // SPILL_MEMORY_SHARE)


def _same_disk(folder: Path, output: Path) -> bool:
    """Whether ``output`` (not written yet: its nearest existing folder tells) is on ``folder``'s
    file system."""
    existing = output.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return os.stat(existing).st_dev == os.stat(folder).st_dev


class MergedSource:
    """``base`` (a ``Source``) with ``adapter`` merged in (see the module docstring).

    ``dense_experts``: hand the merged experts out as dense BF16 (for a target that writes them
    so); otherwise an MXFP4 base keeps MXFP4 experts, re-encoded where touched with ``recipe``."""

    def __init__(self, base, adapter: Adapter, *, recipe: str = "search", dense_experts: bool = False,
                 workers: bool | None = None, output: Path | None = None):
        self.base, self.adapter, self.recipe = base, adapter, recipe
        self.output = output  # where the target writes: the spill leaves it room on a shared disk
        # worker processes for the re-encoding: None = where ``encode_workers.available()`` says so
        self.workers = workers
        self._workers: "encode_workers.MergeWorkers | bool | None" = None
        self.path, self.config, self.config_path = base.path, base.config, base.config_path
        self.experts = "bf16" if dense_experts or base.experts == "bf16" else "mxfp4"
        self._shapes = {s.name: s.shape for s in expected_tensors(base.config, "bf16")}
        self._merges: dict[str, _ExpertMerge] = {}  # the live ones: a layer's, and on workers the next one's
        self._layer: int | None = None  # the layer whose experts the target is reading
        # the layers whose MXFP4 experts are merged (a dense-expert target merges them one at a time)
        self._expert_layers = [] if self.experts == "bf16" else \
            sorted({expert_name(n)[0] for n in adapter.by_target if is_expert_weight(n)})
        # how many adapted layers of re-encoded experts the spill may hold: the next one and those
        # ahead of it, as far as _spill_window and the temporary folder allow (refused if not one)
        self._spill_layers = self._spill_room() if self._expert_layers else 0
        self._tallies: dict[str, _MergeTally] = {}
        self._records: dict[str, dict] = {}
        self._last_bf16: tuple[str | None, np.ndarray | None] = (None, None)
        self._scratch = threading.local()  # each thread's delta rows of a BF16 tensor's merge
        # the adapter's files hashed once, beside the merge (the report is asked for twice, at the end)
        self._hashing = ThreadPoolExecutor(1, thread_name_prefix="hash-adapter")
        self._stopped = threading.Event()  # the conversion is over: a hash still running stops
        self._identity = self._hashing.submit(adapter_identity, adapter, self._hashing_goes_on)
        self._hashing.shutdown(wait=False)

    # -- the Source interface ------------------------------------------------------------

    @property
    def repo_root(self) -> Path:
        return self.base.repo_root

    @property
    def files(self) -> list:
        return self.base.files

    @property
    def tensor_bytes(self) -> int:
        return self.base.tensor_bytes

    def raw(self, name: str):
        self._follow(name)
        logical = name.removesuffix(".blocks").removesuffix(".scales")
        if not self.adapter.touches(logical):
            return self.base.raw(name)
        if is_expert_weight(logical):
            if logical != name:
                merge = self._merge(logical)
                return merge.blocks if name.endswith(".blocks") else merge.scales
            return LazyExperts(self._shapes[name], np.uint16, lambda e: self._dense_expert(name, e))
        return self._merged_bf16(name)

    def chunks(self, name: str, max_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
        self._follow(name)
        logical = name.removesuffix(".blocks").removesuffix(".scales")
        if not self.adapter.touches(logical):
            yield from self.base.chunks(name, max_bytes)
            return
        yield from iter_chunks(self.raw(name), max_bytes)

    def mxfp4(self, layer: int, which: str) -> Mxfp4Pair | None:
        name = f"block.{layer}.mlp.{which}_weight"
        self._follow(name)
        if not self.adapter.touches(name):
            return self.base.mxfp4(layer, which)  # untouched: the base's bytes, whatever the target
        if self.experts == "bf16":
            return None
        merge = self._merge(name)
        return Mxfp4Pair(merge.blocks, merge.scales)

    def expert_f32(self, name: str, e: int) -> np.ndarray:
        """One merged expert in float32, unrounded (``quantize.ExpertEncoder`` encodes from this)."""
        layer, which = expert_name(name)
        pair = self.base.mxfp4(layer, which)
        weight = mxfp4.decode(pair.blocks[e], pair.scales[e]) if pair is not None \
            else bf16_to_f32(np.ascontiguousarray(self.base.raw(name)[e]))
        with self._parent_blas():
            delta = self.adapter.delta(name, self._shapes[name], e) if self.adapter.touches(name) else None
        if delta is not None:
            self._tally_dense(name, e, weight, delta)
            weight = weight + delta
        return weight

    def release(self, name: str) -> None:
        self.base.release(name)

    def scan(self, progress=None) -> list[str]:
        return self.base.scan(progress)

    def close(self) -> None:
        self.stop()
        self.base.close()

    def stop(self) -> None:
        """The conversion is over (done, refused or interrupted): the live merges' temporary files
        go, the worker processes end and the adapter's hash, if a refusal came before it
        finished, stops rather than delay the exit."""
        self._stopped.set()
        for merge in self._merges.values():
            merge.close()
        self._merges.clear()
        if self._workers:
            self._workers.close()
        self._workers = None

    def _hashing_goes_on(self, _count: int) -> None:
        if self._stopped.is_set():
            raise CancelledError

    # -- merging -----------------------------------------------------------------------

    def _merge(self, name: str) -> _ExpertMerge:
        """``name``'s merge, made with its layer's (``_follow``)."""
        if name not in self._merges:  # the target went back to an earlier layer: made again
            self._make_merges([expert_name(name)[0]])
        return self._merges[name]

    def _follow(self, name: str) -> None:
        """The target reads ``name``: the live merges follow its expert weights. Targets go layer
        by layer (Metal writes mlp1 and mlp2 expert by expert, after every dense tensor), so a
        layer's touched expert weights are made together and earlier layers' dropped. On worker
        processes the adapted layers ahead are made and scheduled too, as far as the spill
        allows (``_layers_ahead``), and from the
        target's first tensor on: the workers encode while the target writes the layers before."""
        if not self._expert_layers:
            return
        layer = expert_name(name)[0] if is_expert_weight(name.removesuffix(".blocks").removesuffix(".scales")) \
            else None
        if layer is None:
            if self._layer is not None or not self._merge_workers():
                return
            layer = -1  # the first tensor: the workers start on the first adapted layers
        if layer == self._layer:
            return
        self._layer = layer
        upcoming = [n for n in self._expert_layers if n >= layer]
        live = upcoming[:1 + self._layers_ahead()] if self._merge_workers() else upcoming[:1]
        for old in [n for n in self._merges if expert_name(n)[0] not in live]:
            self._merges.pop(old).close()
        self._make_merges(live)

    def _make_merges(self, layers: list[int]) -> None:
        for n in layers:
            for which in ("mlp1", "mlp2"):
                weight = f"block.{n}.mlp.{which}_weight"
                if self.adapter.touches(weight) and weight not in self._merges:
                    tally = self._tallies.setdefault(weight, _MergeTally(self.recipe))
                    self._merges[weight] = _ExpertMerge(self.base.mxfp4(n, which), self.adapter, weight, self.recipe,
                                                        tally, partial(self.base.release, weight), self._merge_workers())
                if weight in self._merges:
                    self._merges[weight].schedule()

    def _layers_ahead(self) -> int:
        """How many adapted layers beyond the next one the workers may encode ahead of the target:
        ``_spill_window()`` of them, one at least, as far as the temporary folder has room."""
        return self._spill_layers - 1  # the layers the spill may hold, the next one's included

    def _spill_layer_bytes(self) -> int:
        """An adapted layer's re-encoded experts in the spill: MXFP4's half byte a value, and a scale
        byte every BLOCK values."""
        return sum(int(np.prod(self._shapes[f"block.0.mlp.{w}_weight"])) for w in ("mlp1", "mlp2")) * \
            (mxfp4.BLOCK // 2 + 1) // mxfp4.BLOCK

    def _spill_room(self) -> int:
        """Adapted layers of spill that fit the temporary folder's free space (at most as many as
        the workers would keep); refused where not one does, before anything is written. Where the
        output is written on the same disk, the spill leaves it the base's size (what the target
        writes, about): fewer layers ahead, rather than a disk filled by the spill mid-merge."""
        folder, layer_bytes = tempfile.gettempdir(), self._spill_layer_bytes()
        free = shutil.disk_usage(folder).free
        room = free - SPILL_MARGIN_BYTES
        if room < layer_bytes:
            raise OssConvertError(f"the merge keeps each adapted layer's re-encoded experts in a temporary file, "
                                  f"{layer_bytes / 1e9:.2f} GB a layer, and {folder} has {free / 1e9:.2f} GB free: "
                                  "set TMPDIR to a folder with room")
        if self.output is not None and _same_disk(Path(folder), self.output):
            room -= self.base.tensor_bytes
        return int(min(max(1, room // layer_bytes), 1 + max(1, _spill_window() // layer_bytes)))

    def _merge_workers(self) -> "encode_workers.MergeWorkers | None":
        """The worker processes, started at the first merge of experts large enough to pay for them."""
        if self._workers is None:
            largest = max(int(np.prod(self._shapes[f"block.0.mlp.{w}_weight"][1:])) for w in ("mlp1", "mlp2"))
            use = self.workers if self.workers is not None else \
                encode_workers.available() and largest >= encode_workers.MIN_VALUES
            factors = max((self.adapter.expert_factor_values(name) for name in self._shapes if is_expert_weight(name)),
                          default=0)
            self._workers = self._start_workers(largest, factors) if use else False
        return self._workers or None

    @staticmethod
    def _start_workers(values: int, factor_values: int) -> "encode_workers.MergeWorkers | bool":
        """The worker processes, or False (threads) where they cannot start: a spawned worker
        fails when the caller's script imports this without a ``__main__`` guard, and shared
        memory may be refused. Only the speed differs."""
        try:
            return encode_workers.MergeWorkers(values, factor_values)
        except (OSError, BrokenExecutor) as error:
            warnings.warn(f"the merge runs on threads: its worker processes could not start ({error})")
            return False

    def _parent_blas(self):
        """While worker processes hold every core, the parent's products run on one BLAS thread
        (a multithreaded BLAS's threads would spin beside them)."""
        return encode_workers.one_blas_thread() if self._workers else contextlib.nullcontext()

    def _merged_bf16(self, name: str) -> np.ndarray:
        """``name`` merged and rounded to BF16 once, a chunk of rows at a time (each chunk's delta
        made, added and rounded while in cache: the whole tensor's float32 copies cost as many
        page faults as the arithmetic); the last one kept, as a target may read a tensor's row
        ranges one after another (MLX's q, k and v out of qkv)."""
        if self._last_bf16[0] == name:
            return self._last_bf16[1]
        raw = self.base.raw(name)
        terms = self.adapter.terms(name)
        rows, cols = raw.shape
        merged = np.empty((rows, cols), dtype=np.uint16)
        step = max(1, quantize.CHUNK_VALUES // cols)

        def merge_rows(first: int) -> tuple[float, float]:
            part = slice(first, min(first + step, rows))
            change = delta_rows(terms, part.start, part.stop, _thread_rows(self._scratch, (part.stop - first, cols)))
            weight = bf16_to_f32(np.ascontiguousarray(raw[part]))
            energies = quantize.sum_of_squares(change), quantize.sum_of_squares(weight)
            merged[part] = f32_to_bf16(np.add(weight, change, out=weight))
            return energies

        # The chunks on the encoder's threads, each product on one BLAS thread: on the target's
        # critical path, and the merge's workers yield these cores (encode_workers._run_when_idle).
        with encode_workers.one_blas_thread():
            sums = quantize.map_in_order(merge_rows, range(0, rows, step), rows * cols)
        delta_energy = sum(delta for delta, _ in sums)  # in the chunks' order: the same sums as one thread's
        base_energy = sum(base for _, base in sums)
        self.adapter.release(name)
        self.base.release(name)
        if not delta_energy:  # exactly zero (a float32 squared never underflows in float64): the base's bytes
            return self.base.raw(name)
        self._records[name] = {"delta_relative_norm": _relative(delta_energy, base_energy)}
        self._last_bf16 = (name, merged)
        return merged

    def _dense_expert(self, name: str, e: int) -> np.ndarray:
        return f32_to_bf16(self.expert_f32(name, e))

    def _tally_dense(self, name: str, e: int, weight: np.ndarray, delta: np.ndarray) -> None:
        record = self._records.setdefault(name, {"experts": set(), "delta_energy": 0.0, "base_energy": 0.0})
        if e in record["experts"]:
            return
        record["experts"].add(e)
        record["delta_energy"] += quantize.sum_of_squares(delta)
        record["base_energy"] += quantize.sum_of_squares(weight)

    # -- what changed --------------------------------------------------------------------

    def report(self) -> dict:
        """Per tensor changed: the delta's relative norm; per expert weight the experts re-encoded
        and their MXFP4 error; the adapter's files and their sha256."""
        tensors = {}
        for name, record in sorted(self._records.items()):
            if "experts" in record:
                tensors[name] = {"delta_relative_norm": _relative(record["delta_energy"], record["base_energy"]),
                                 "dense_experts_merged": len(record["experts"])}
            else:
                tensors[name] = record
        for name, tally in sorted(self._tallies.items()):
            tensors[name] = tally.record()
        return {"adapter": self._identity.result(), "recipe": self.recipe, "tensors": tensors}

    def summary_line(self) -> str:
        report = self.report()["tensors"]
        reencoded = sum(len(r.get("reencoded_experts", ())) for r in report.values())
        dense = sum(r.get("dense_experts_merged", 0) for r in report.values())
        how = [f"{reencoded} experts re-encoded to MXFP4 ({self.recipe})"] if reencoded else []
        how += [f"{dense} dense experts merged unrounded" + (" (the target encodes them)" if self.experts == "bf16"
                                                             and self.base.experts == "bf16" else " (kept in BF16)")] \
            if dense else []
        return f"adapter merged: {len(report)} tensors changed; " + ("; ".join(how) or "no expert changed") + \
            "; everything else copied"


def adapter_identity(adapter: Adapter, progress: Callable[[int], None] | None = None) -> dict:
    """The adapter's format, path and files (size, sha256); ``progress`` as ``file_sha256``'s."""
    return {"format": adapter.format, "path": str(adapter.path),
            "files": {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f, progress)} for f in adapter.files}}


class AdaptedModel:
    """``model`` (a ``CanonicalModel``) with ``adapter`` applied exactly in float32: the reference
    of a merged artifact. Expert weights the adapter touches are given one expert at a time
    (``expert_f32``; ``mxfp4`` says ``None`` for them, as for any dense storage)."""

    def __init__(self, model, adapter: Adapter):
        self.model, self.adapter, self.config = model, adapter, model.config
        self._shapes = {s.name: s.shape for s in expected_tensors(model.config, "bf16")}

    def f32(self, name: str) -> np.ndarray:
        if is_expert_weight(name) and self.adapter.touches(name):
            return np.stack([self.expert_f32(name, e) for e in range(self.config.num_experts)])
        weight = self.model.f32(name)
        delta = self.adapter.delta(name, weight.shape) if self.adapter.touches(name) else None
        return weight if delta is None else np.asarray(weight, dtype=np.float32) + delta

    def f32_rows(self, name: str, rows) -> np.ndarray:
        if not self.adapter.touches(name):
            return self.model.f32_rows(name, rows)
        return np.ascontiguousarray(self.f32(name)[rows])

    def expert_f32(self, name: str, e: int) -> np.ndarray:
        layer, which = expert_name(name)
        weight = self.base_expert_f32(layer, which, e)
        delta = self.adapter.delta(name, self._shapes[name], e) if self.adapter.touches(name) else None
        return weight if delta is None else weight + delta

    def base_expert_f32(self, layer: int, which: str, e: int) -> np.ndarray:
        pair = self.model.mxfp4(layer, which)
        if pair is not None:
            return mxfp4.decode(pair.blocks[e], pair.scales[e])
        name = f"block.{layer}.mlp.{which}_weight"
        one = getattr(self.model, "expert_f32", None)  # readers that read one expert (not the layer)
        return one(name, e) if one is not None else np.asarray(self.model.f32(name)[e], dtype=np.float32)

    def changed_experts(self, layer: int, which: str) -> set[int]:
        """Experts whose summed delta is not exactly zero (the rest of a merge must be the base's bytes)."""
        name = f"block.{layer}.mlp.{which}_weight"
        candidates = self.adapter.touched_experts(name, self.config.num_experts)
        return {e for e in candidates if self.adapter.delta(name, self._shapes[name], e) is not None}

    def base_mxfp4(self, layer: int, which: str) -> Mxfp4Pair | None:
        """The base's own MXFP4 bytes (untouched experts of a merged artifact must be these)."""
        return self.model.mxfp4(layer, which)

    def mxfp4(self, layer: int, which: str) -> Mxfp4Pair | None:
        if self.adapter.touches(f"block.{layer}.mlp.{which}_weight"):
            return None
        return self.model.mxfp4(layer, which)

    def storage(self, name: str) -> str:
        return "F32" if self.adapter.touches(name) else self.model.storage(name)

    def release(self, name: str) -> None:
        self.model.release(name)

    def mxfp4_halves(self, layer: int, which: str):
        """The base's split MXFP4 halves, only for expert weights the adapter leaves alone."""
        base = getattr(self.model, "mxfp4_halves", None)
        return None if base is None or self.adapter.touches(f"block.{layer}.mlp.{which}_weight") else base(layer, which)

    def bf16_bits(self, name: str) -> np.ndarray | None:
        """The base's stored bits, only for tensors the adapter leaves alone."""
        base = getattr(self.model, "bf16_bits", None)
        return None if base is None or self.adapter.touches(name) else base(name)

    def embedded(self):
        return self.model.embedded()

    def __getattr__(self, name: str):  # the rest of the reader (path, vocabulary, tokenizer files)
        return getattr(self.model, name)

    def close(self) -> None:
        self.adapter.close()
        self.model.close()
