"""The fault-injection hook, and the engine's split-and-retry on out-of-memory."""

from __future__ import annotations

import logging

import pytest

from rerankd.metrics import Metrics
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch
from tests.fixtures.paths import fixture_dir

DOCS = ["alpha beta", "gamma delta epsilon", "zeta", "eta theta iota kappa", "lambda mu"]


def _model(faults: str | None = None, engine: str = "auto"):
    settings = Settings(
        model=str(fixture_dir("qwen3")),
        dtype="float32",
        device="cpu",
        engine=engine,
        fault_injection=faults,
    )
    return load_model(settings, Metrics())


def _scores(model, docs=DOCS):
    pairs = model.recipe.encode(["a query"] * len(docs), docs)
    return model.scheduler.engine.score(Batch(pairs, [0] * len(pairs)))


@pytest.mark.parametrize("engine", ["packed", "transformers"])
def test_simulated_oom_splits_the_batch_and_gives_the_same_scores(engine, caplog):
    """The fault wraps every engine's public `forward`, inside its split-and-retry path."""
    expected = _scores(_model(engine=engine))
    faulty = _model("oom-above:2", engine=engine)
    assert faulty.scheduler.engine.name == f"{engine}+faults"
    with caplog.at_level(logging.WARNING, logger="rerankd.engine.base"):
        assert _scores(faulty) == pytest.approx(expected, abs=1e-5)
    assert "out of memory on 5 pairs" in caplog.text


def test_raise_on_marker_fails_only_batches_holding_it():
    model = _model("raise-on:FAULT_MARKER")
    with pytest.raises(RuntimeError, match="injected"):
        _scores(model, [*DOCS, "text with FAULT_MARKER inside"])
    assert len(_scores(model)) == len(DOCS)


def test_unknown_directive_is_rejected():
    with pytest.raises(Exception, match="unknown fault directive"):
        _model("explode:1")
