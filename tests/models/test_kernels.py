"""The one kernel contract of every packed model (models/kernels.py): `set_kernels(Kernels)`
and a declared `compiles`; what a model cannot run is refused before anything changes, and
the engine asks a model for compiled per-token work only where it declares them."""

from __future__ import annotations

import pytest
import torch

from rerankd.engine.packed_engine import PackedEngine
from rerankd.models.colbert import ColbertEncoder
from rerankd.models.decoder import Decoder, DecoderConfig, DecoderReranker
from rerankd.models.encoder import Encoder, EncoderConfig
from rerankd.models.gemma2_lightweight import LightweightConfig, LightweightReranker
from rerankd.models.kernels import Kernels
from rerankd.models.minicpm import LayerwiseReranker
from rerankd.models.modernbert import ModernBert
from tests.fixtures.modernbert import random_modernbert

PACKED_MODELS = {
    Decoder: True,
    DecoderReranker: True,
    LayerwiseReranker: True,
    Encoder: True,
    ModernBert: False,
    ColbertEncoder: False,
    LightweightReranker: False,
}


def _decoder_config() -> DecoderConfig:
    return DecoderConfig(
        vocab_size=50,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        gemma_norm=True,
        activation="gelu_tanh",
    )


def _colbert() -> ColbertEncoder:
    config = EncoderConfig(50, 32, 2, 2, 64, 64, 2, 1e-12)
    return ColbertEncoder(config, [])


def _lightweight() -> LightweightReranker:
    config = LightweightConfig(_decoder_config(), 16.0, 4, None, start_layer=1)
    return LightweightReranker(config)


@pytest.mark.parametrize(("cls", "compiles"), PACKED_MODELS.items())
def test_every_packed_model_declares_whether_it_compiles(cls, compiles):
    declared = next(vars(c)["compiles"] for c in cls.__mro__ if "compiles" in vars(c))
    assert declared is compiles
    assert callable(cls.set_kernels)


@pytest.mark.parametrize("cls", [ModernBert, ColbertEncoder, LightweightReranker, Encoder])
def test_set_attention_is_no_public_entry_point(cls):
    assert not hasattr(cls, "set_attention")


def _attention_state(model) -> tuple:
    """What a model's kernel choice changed: each layer's attention function, and the
    model's own record of the choice where it keeps one."""
    layers = getattr(model, "layers", [])
    attends = tuple(getattr(getattr(layer, "attention", None), "attend", None) for layer in layers)
    return attends, getattr(model, "kernels", None)


@pytest.mark.parametrize("build", [lambda: random_modernbert(3), _colbert, _lightweight])
def test_models_without_compiled_functions_refuse_them_and_change_nothing(build):
    model = build()
    model.set_kernels(Kernels("sdpa"))
    before = _attention_state(model)
    with pytest.raises(ValueError, match="no compiled per-token functions"):
        model.set_kernels(Kernels("sdpa", compiled=True))
    with pytest.raises(ValueError, match="no-such-kernel"):
        model.set_kernels(Kernels("no-such-kernel"))
    assert _attention_state(model) == before


def test_the_lightweight_model_refuses_any_attention_but_sdpa():
    with pytest.raises(ValueError, match="'amx'"):
        _lightweight().set_kernels(Kernels("amx"))


def test_modernbert_takes_the_attention_kernel_in_global_and_local_layers():
    model = random_modernbert(3)
    before = _attention_state(model)[0]
    model.set_kernels(Kernels("sdpa_padded"))
    after = _attention_state(model)[0]
    assert after[0] is not before[0]  # the global layer: the padded SDPA kernel itself
    assert after[1:] != before[1:]  # local layers: its windowed form, not band SDPA


def test_colbert_runs_the_chosen_kernel_on_unlimited_keys():
    from rerankd.ops import attention
    from rerankd.ops.batch import pack
    from rerankd.types import EncodedPair

    torch.manual_seed(0)
    model = _colbert().eval()
    calls = []

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return attention.ATTENTION["sdpa"](*args, **kwargs)

    batch = pack([EncodedPair((1, 2, 3, 4)), EncodedPair((5, 6))], None, torch.device("cpu"))
    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setitem(attention.ATTENTION, "counting", counting)
        expected = model(batch)
        model.set_kernels(Kernels("counting"))
        got = model(batch)
        model(batch, keys=[2, 2])  # limited keys: per-sequence SDPA, not the chosen kernel
    assert calls == [6, 6]  # once per layer over the stream, for the unlimited batch only
    assert torch.equal(got, expected)


def _engine(model) -> PackedEngine:
    """An engine object with only what `_wants_compile` and `use_kernels` read."""
    engine = object.__new__(PackedEngine)
    engine.model = model
    return engine


def test_the_engine_never_asks_a_model_that_does_not_compile(caplog):
    engine = _engine(random_modernbert(3))
    cpu = torch.device("cpu")
    assert engine._wants_compile("on", cpu, torch.bfloat16) is False
    assert "runs eager only" in caplog.text
    engine.use_kernels("sdpa_padded")  # the contract's one call, attention only
    assert engine.attention == "sdpa_padded"
    with pytest.raises(ValueError, match="no compiled per-token functions"):
        engine.use_kernels("sdpa", compiled=True)
