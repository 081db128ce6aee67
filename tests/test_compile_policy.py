"""`--compile auto` per CPU class: the measured table (engine/compile_policy.py), the class
rerankd detects (with its `RERANKD_CPU_FLAGS` override), the engine's use of it, and the
copy of the table in docs/benchmarks.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rerankd.engine.compile_policy import (
    CUDA_MEASURED,
    LISTWISE,
    LISTWISE_MEASURED,
    MEASURED,
    compile_pays,
    cpu_class,
    model_family,
    wants_compile,
)
from rerankd.engine.packed_engine import PackedEngine
from rerankd.metrics import Metrics
from rerankd.models.decoder import DecoderReranker
from rerankd.models.encoder import Encoder
from rerankd.models.minicpm import LayerwiseReranker
from rerankd.models.modernbert import ModernBert
from rerankd.ops.cpu import CPU_CLASSES, CPU_FLAGS_ENV
from rerankd.runtime import load_model
from rerankd.settings import Settings
from tests.fixtures.paths import fixture_dir

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
#: the flags of each class as the override gives them ("amx" itself reads /proc/cpuinfo)
FLAGS = {name: env[CPU_FLAGS_ENV] for name, env in CPU_CLASSES.items() if env[CPU_FLAGS_ENV]}
FLAGS["amx"] = FLAGS["zen4"] + " amx_bf16 amx_tile amx_int8"
MODELS = {
    "encoder": Encoder,
    "decoder": DecoderReranker,
    "layerwise": LayerwiseReranker,
    "modernbert": ModernBert,
}


def _engine(model_class: type) -> PackedEngine:
    """An engine object with only what `_wants_compile` reads (no model to load)."""
    engine = object.__new__(PackedEngine)
    engine.model = object.__new__(model_class)  # for isinstance / hasattr only
    return engine


@pytest.mark.parametrize("name", list(CPU_CLASSES))
def test_each_emulated_class_is_detected_through_the_flag_override(monkeypatch, name):
    monkeypatch.setenv(CPU_FLAGS_ENV, FLAGS[name])
    assert cpu_class() == name


def test_a_cpu_without_avx2_or_readable_flags_is_other():
    assert cpu_class({"sse2", "fpu"}) == "other"
    assert cpu_class(set()) == "other"  # e.g. an ARM CPU: /proc/cpuinfo says "Features"


def test_model_families():
    assert model_family(object.__new__(Encoder)) == "encoder"
    assert model_family(object.__new__(DecoderReranker)) == "decoder"
    assert model_family(object.__new__(LayerwiseReranker)) == "decoder"  # decoder kernels
    assert model_family(object.__new__(ModernBert)) == "other"


@pytest.mark.parametrize(("key", "pays"), sorted(MEASURED.items()))
def test_auto_follows_the_measured_table_on_each_class(monkeypatch, key, pays):
    cls, family, dtype_name, quantized = key
    dtype = getattr(torch, dtype_name)
    monkeypatch.setenv(CPU_FLAGS_ENV, FLAGS[cls])
    engine = _engine(MODELS[family])
    assert engine._wants_compile("auto", CPU, dtype, quantized) is pays
    # CUDA reads its own table (CUDA_MEASURED), whatever the CPU; `on` and `off` force
    # either way everywhere
    on_cuda = CUDA_MEASURED.get((family, dtype_name, quantized), False)
    assert engine._wants_compile("auto", CUDA, dtype, quantized) is on_cuda
    for device in (CPU, CUDA):
        assert engine._wants_compile("on", device, dtype, quantized) is True
        assert engine._wants_compile("off", device, dtype, quantized) is False
    with pytest.raises(ValueError, match="--compile"):
        engine._wants_compile("sometimes", CPU, dtype, quantized)


def test_the_table_covers_each_class_family_and_precision_measured():
    bf16_classes = {
        (cls, family, dtype, quantized)
        for cls in ("amx", "zen4")
        for family in ("decoder", "encoder")
        for dtype in ("bfloat16", "float32")
        for quantized in (False, True)
    }
    # no bf16 instructions: float32 activations (`--dtype auto`), with and without int8
    float32_classes = {
        (cls, family, "float32", quantized)
        for cls in ("avx512-vnni", "avx2")
        for family in ("decoder", "encoder")
        for quantized in (False, True)
    }
    assert set(MEASURED) == bf16_classes | float32_classes


@pytest.mark.parametrize("cls", list(FLAGS))
def test_what_was_not_measured_runs_eager(monkeypatch, cls):
    monkeypatch.setenv(CPU_FLAGS_ENV, FLAGS[cls])
    assert compile_pays(cls, "decoder", torch.float16, False, CPU) is False  # fp16 on CPU
    assert compile_pays(cls, "other", torch.bfloat16, False, CPU) is False
    assert compile_pays("other", "decoder", torch.float32, True, CPU) is False
    # a model with no compiled kernels (ModernBERT) never compiles, not even with `on`
    assert _engine(ModernBert)._wants_compile("on", CPU, torch.bfloat16) is False
    assert _engine(ModernBert)._wants_compile("auto", CPU, torch.bfloat16, True) is False


def test_cuda_compiles_only_what_was_measured_on_the_gpu_machine():
    # measured on one H200 (W-GPU 0.6B): the bf16 decoder compiles; the rest runs eager
    assert compile_pays("amx", "decoder", torch.bfloat16, False, CUDA) is True
    assert compile_pays("other", "decoder", torch.bfloat16, False, CUDA) is True  # any host CPU
    assert compile_pays("amx", "encoder", torch.bfloat16, False, CUDA) is False
    assert compile_pays("amx", "decoder", torch.float16, False, CUDA) is False
    assert compile_pays("amx", "decoder", torch.float32, False, CUDA) is False
    assert compile_pays("amx", LISTWISE, torch.bfloat16, False, CUDA) is False
    assert compile_pays("amx", "decoder", torch.bfloat16, False, torch.device("meta")) is False


def _docs_table() -> dict[tuple[str, str, str, bool], bool]:
    """The decision table of docs/benchmarks.md's "--compile auto, per CPU class" section:
    rows `| class | model | activations | int8 | ... | on/off |`."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## --compile auto, per CPU class", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip().strip("*`") for c in line.strip().strip("|").split("|")]
        if len(cells) > 4 and cells[0] in CPU_CLASSES and re.fullmatch(r"on|off", cells[-1]):
            key = (cells[0], cells[1], cells[2], cells[3] == "int8")
            assert key not in table, f"{key} twice in docs/benchmarks.md"
            table[key] = cells[-1] == "on"
    return table


def test_docs_state_the_table_the_code_reads():
    assert _docs_table() == {**MEASURED, **LISTWISE_MEASURED}


def _compiled(fixture: str, dtype: str) -> bool:
    settings = Settings(model=str(fixture_dir(fixture)), dtype=dtype, compile="auto")
    return load_model(settings, Metrics()).scheduler.engine.compiled


@pytest.mark.parametrize(
    ("cls", "fixture", "dtype", "family"),
    [("amx", "qwen3", "bfloat16", "decoder"), ("avx2", "qwen3", "float32", "decoder")],
)
def test_a_served_model_compiles_as_the_table_says(monkeypatch, cls, fixture, dtype, family):
    # a tiny fixture, loaded as the server loads it, with rerankd's flags of the class
    monkeypatch.setenv(CPU_FLAGS_ENV, FLAGS[cls])
    assert _compiled(fixture, dtype) is MEASURED[(cls, family, dtype, False)]


def test_the_listwise_table_covers_each_class_and_precision_measured():
    # no int8 in the listwise engine; bf16 only where the class has bf16 instructions
    bf16_classes = {
        (c, LISTWISE, d, False) for c in ("amx", "zen4") for d in ("bfloat16", "float32")
    }
    float32_classes = {(c, LISTWISE, "float32", False) for c in ("avx512-vnni", "avx2")}
    assert set(LISTWISE_MEASURED) == bf16_classes | float32_classes


@pytest.mark.parametrize("cls", list(FLAGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_listwise_engine_decides_from_its_own_rows(monkeypatch, cls, dtype):
    # LISTWISE_MEASURED, not the packed decoder's rows; unlisted (bf16 without bf16 ISA): eager
    monkeypatch.setenv(CPU_FLAGS_ENV, FLAGS[cls])
    key = (cls, LISTWISE, str(dtype).removeprefix("torch."), False)
    assert wants_compile("auto", LISTWISE, dtype, False, CPU) is LISTWISE_MEASURED.get(key, False)
    assert wants_compile("auto", LISTWISE, dtype, False, CUDA) is False
    assert wants_compile("on", LISTWISE, dtype, False, CPU) is True
    assert wants_compile("off", LISTWISE, dtype, False, CPU) is False
