"""Promise: bounded memory. Inputs are memory-mapped and written tensor by tensor, so the peak
memory of a conversion does not grow with the model: for every registered target, a model five
times deeper (the same widths) peaks within a few MiB of the shallow one. ``synth`` and the
scan (``inspect --scan``) hold to it too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from oss_convert import converters, synth

from targets import Case, params

# Wide enough that a layer is ~13 MB of MXFP4 experts: 12 more layers are ~160 MB more to read.
# Measured: Metal 222 MiB at 2 and 14 layers (its peak is the parse of the full tokenizer.json),
# the other targets 60-72 MiB.
WIDE = dict(hidden_size=512, intermediate_size=512, num_experts=32)
SHALLOW, DEEP = 2, 14
GROWTH_MIB = 48  # allowed growth of the peak; holding the extra layers would take > 150 MiB

# The peak is the process's own VmHWM: ru_maxrss is carried across fork and exec on Linux, so a
# child of a big pytest process would report the parent's size (seen: 392 MiB for a 222 MiB job).
HWM = "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)"
PEAK = ("import sys; from oss_convert.cli.main import main; sys.argv = ['oss-convert', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n" + HWM)


def peak_mib(*args: str) -> float:
    result = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stderr.strip().splitlines()[-1]) / 1024


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """(preset, layers) -> a synthetic repo, made on demand."""
    made: dict[tuple[str, int], Path] = {}
    root = tmp_path_factory.mktemp("memory")

    def make(preset: str, layers: int) -> Path:
        if (preset, layers) not in made:
            config = synth.preset_with(preset, num_hidden_layers=layers, **WIDE)
            made[preset, layers] = synth.generate(root / f"{preset}-{layers}", config, seed=3, tokenizer=True)
        return made[preset, layers]

    return make


@pytest.mark.slow
@pytest.mark.parametrize("case", [p for p in params() if p.values[0].source != "dense_repo"])
def test_a_conversion_needs_no_more_memory_for_a_deeper_model(case: Case, models, tmp_path):
    preset = "metal" if converters.TARGETS[case.target].full_vocabulary else "tiny"
    peaks = [peak_mib(*case.args(models(preset, layers), tmp_path / str(layers) / case.output))
             for layers in (SHALLOW, DEEP)]
    assert peaks[1] < peaks[0] + GROWTH_MIB, f"{case.name}: peak RSS grew from {peaks[0]:.0f} to {peaks[1]:.0f} MiB"


@pytest.mark.slow
def test_generate_streams_in_bounded_memory(tmp_path):
    """A 50-layer, 200 MB-per-layer model needs no more memory than a 2-layer one."""
    script = (
        "import resource, sys; from oss_convert import synth;"
        "cfg = synth.preset_with('tiny', num_hidden_layers=int(sys.argv[2]), num_experts=32, hidden_size=1024,"
        " intermediate_size=1024, vocab_size=4096);"
        "synth.generate(sys.argv[1], cfg);"
        + HWM.replace(", file=sys.stderr", "")
    )
    peaks = []
    for layers in (2, 20):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"m{layers}"), str(layers)],
                             check=True, capture_output=True, text=True)
        peaks.append(int(out.stdout.strip()) / 1024)  # MiB
    size = sum(p.stat().st_size for p in (tmp_path / "m20").rglob("*.safetensors")) / 2**20
    assert size > 900
    assert peaks[1] < peaks[0] + 64, f"peak RSS grew from {peaks[0]:.0f} to {peaks[1]:.0f} MiB"

    # Reading every byte back (inspect --scan) through the memory map stays flat as well:
    # touched file pages count towards RSS unless the reader unmaps them as it goes.
    scan = (
        "import resource, sys; from oss_convert.formats.original import OriginalCheckpoint;"
        "ckpt = OriginalCheckpoint(sys.argv[1]); assert ckpt.scan() == [];" + HWM.replace(", file=sys.stderr", "")
    )
    out = subprocess.run([sys.executable, "-c", scan, str(tmp_path / "m20")], check=True, capture_output=True, text=True)
    assert int(out.stdout.strip()) / 1024 < peaks[0] + 160, "scan held the file's pages"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["mlx", "gguf", "hf"])
def test_an_adapter_merge_needs_no_more_memory_for_a_deeper_model(target, models, tmp_path):
    """``convert --adapter`` with an adapter on the attention and every expert of every layer (so
    the deep model re-encodes 7x the experts): the peak stays that of the shallow merge."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from merge_bench import write_adapter  # the benchmark's PEFT adapter, at these widths

    peaks = []
    for layers in (SHALLOW, DEEP):
        repo = models("tiny", layers)
        config = json.loads((repo / "original" / "config.json").read_text())
        adapter = tmp_path / f"adapter-{layers}"
        write_adapter(config, list(range(layers)), adapter)
        out = tmp_path / str(layers) / ("out.gguf" if target == "gguf" else "out")
        peaks.append(peak_mib("convert", str(repo), "--to", target, "-o", str(out), "--adapter", str(adapter), "--quiet"))
    assert peaks[1] < peaks[0] + GROWTH_MIB, f"{target}: peak RSS grew from {peaks[0]:.0f} to {peaks[1]:.0f} MiB"
