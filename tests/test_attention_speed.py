"""CPU attention kernels are kept by agreement with SDPA *and* measured speed.

`speedup_over_sdpa` must rank a slower backend below 1 and a faster one above; the packed
engine's `auto` must drop a kernel that agrees but is slower (the AVX512-BF16 kernel on an
AMX Xeon, whose SDPA runs on AMX), and `--attention amx|avx512` must force one regardless.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from rerankd.engine import packed_engine
from rerankd.errors import ModelLoadError
from rerankd.metrics import Metrics
from rerankd.ops import attention
from rerankd.ops.attention_speed import AttentionShape, speedup_over_sdpa
from rerankd.runtime import load_model
from rerankd.settings import Settings
from tests.fixtures.paths import fixture_dir

SHAPE = AttentionShape(heads=4, kv_heads=2, head_dim=16, causal=True)


def _slow_sdpa(*args, **kwargs):
    time.sleep(0.05)  # far beyond SDPA on this shape (~1 ms), even on a busy machine
    return attention.sdpa_attention(*args, **kwargs)


def _no_work(q, k, v, batch, prefix_kv, causal, scale, out=None):
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
def test_a_slower_backend_measures_below_one_and_a_faster_one_above(monkeypatch, causal):
    monkeypatch.setitem(attention.ATTENTION, "slow", _slow_sdpa)
    monkeypatch.setitem(attention.ATTENTION, "free", _no_work)
    shape = SHAPE._replace(causal=causal)
    assert speedup_over_sdpa("slow", shape, torch.bfloat16) < 1.0
    assert speedup_over_sdpa("free", shape, torch.bfloat16) > 1.0


def _engine(attention_mode: str, dtype: str = "bfloat16"):
    settings = Settings(
        model=str(fixture_dir("qwen3")),
        dtype=dtype,
        device="cpu",
        engine="packed",
        attention=attention_mode,
    )
    return load_model(settings, Metrics()).scheduler.engine


@pytest.fixture
def one_candidate(monkeypatch):
    """`auto` sees one CPU kernel, `amx` (SDPA itself when the AMX kernel does not load, so it
    always agrees), with a speed the test sets."""
    monkeypatch.setattr(packed_engine, "cpu_backends", lambda: iter(["amx"]))

    def with_speedup(value: float) -> None:
        monkeypatch.setattr(packed_engine, "speedup_over_sdpa", lambda *args: value)

    return with_speedup


def test_auto_drops_a_kernel_that_agrees_but_is_slower_than_sdpa(one_candidate, caplog):
    one_candidate(0.7)
    with caplog.at_level(logging.WARNING, logger=packed_engine.__name__):
        engine = _engine("auto")
    assert engine.attention == "sdpa"
    assert "runs at 0.70x its speed" in caplog.text


def test_auto_keeps_a_kernel_that_agrees_and_is_faster(one_candidate):
    one_candidate(1.8)
    assert _engine("auto").attention == "amx"


def test_a_forced_kernel_is_kept_whatever_its_speed(one_candidate):
    one_candidate(0.1)
    assert _engine("amx").attention == "amx"


def test_a_forced_kernel_outside_bf16_falls_back_to_sdpa_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=packed_engine.__name__):
        engine = _engine("avx512", dtype="float32")
    assert engine.attention == "sdpa"
    assert "--attention avx512" in caplog.text


def test_an_unknown_attention_mode_names_the_choices():
    with pytest.raises(ModelLoadError, match="auto, sdpa, amx or avx512"):
        _engine("fastest")
