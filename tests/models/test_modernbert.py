"""ModernBERT cross-encoders (gte-reranker-modernbert-base) on the packed engine, against
transformers' `ModernBertForSequenceClassification` and sentence-transformers' `CrossEncoder`.

The fixture (tests/fixtures/modernbert.py) keeps the card's layer pattern (global, local,
local, global) with a window of ±8 tokens, so most test pairs are several windows long and
a wrong window, or no window, changes scores (checked). float32 |Δ| ≤ 1e-4; bf16 ≤ 2e-2 with
the reference's order wherever its gap is clear.
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig
from transformers import ModernBertConfig as HFModernBertConfig

from rerankd.metrics import Metrics
from rerankd.models import modernbert
from rerankd.models.modernbert import (
    CHUNK_SPAN,
    ModernBertConfig,
    band_sdpa_attention,
    load_modernbert,
)
from rerankd.models.weights import open_checkpoint
from rerankd.ops.amx_kernel import load_kernel
from rerankd.ops.attention import cpu_backends
from rerankd.ops.batch import pack
from rerankd.ops.prepack import PrepackedGatedLinear, PrepackedLinear, prepack_supported
from rerankd.recipes import sigmoid
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch, EncodedPair
from tests import reference
from tests.fixtures.modernbert import GTE_RERANKER_CONFIG, build_modernbert_cross_encoder
from tests.words import WORDS

QUERY = "what is the capital of china?"


def sentence(seed: int, words: int) -> str:
    """A seeded English text of `words` words from the test vocabulary."""
    vocabulary = [w for w in WORDS if w.isascii()]
    return " ".join(vocabulary[(seed * 7 + i * (seed + 3)) % len(vocabulary)] for i in range(words))


DOCUMENTS = [
    "Beijing is the capital of China.",
    "Gravity is a force that attracts objects with mass.",
    "北京是中华人民共和国的首都。🎉",
    "",
    *(sentence(i, n) for i, n in enumerate((20, 45, 80, 150, 300))),
    "word " * 700,  # longer than the 128-token limit below: exercises truncation
]
TOLERANCE_FP32 = 1e-4
#: bf16, as tests/test_parity.py: on the scores clients get (activated, in [0, 1]), and a
#: reference gap of CLEAR_GAP or more keeps its order
TOLERANCE_BF16 = 2e-2
CLEAR_GAP = 0.05


def _dir(pooling: str = "mean") -> str:
    return _build(pooling)


@cache
def _build(pooling: str) -> str:
    """The fixture, built once per process (~3 s) into a directory removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="rerankd-modernbert-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return str(build_modernbert_cross_encoder(root / pooling, pooling=pooling))


@cache
def _model(pooling: str = "mean", engine: str = "packed", dtype: str = "float32", max_len=128):
    settings = Settings(
        model=_dir(pooling),
        dtype=dtype,
        max_model_len=max_len,
        device="cpu",
        engine=engine.split("-")[0],
        attention="sdpa" if engine == "packed-sdpa" else "auto",
    )
    model = load_model(settings, Metrics())
    assert model.recipe.name == "cross-encoder"
    assert model.scheduler.engine.name == engine.split("-")[0]
    return model


@cache
def _reference(pooling: str = "mean", max_len: int = 128):
    return reference.cross_encoder_reference(_dir(pooling), QUERY, DOCUMENTS, max_length=max_len)


def _score(model, documents=DOCUMENTS, query=QUERY) -> tuple[list[EncodedPair], list[float]]:
    pairs = model.recipe.encode([query] * len(documents), documents, None)
    return pairs, model.scheduler.engine.score(Batch(pairs, None))


def _order(scores) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


# --- config and tokens ----------------------------------------------------------------------


def test_config_reads_the_hub_card():
    """The card's 4.48-style config.json (global_attn_every_n_layers, *_rope_theta) read
    through transformers 5 gives the card's model."""
    values = {k: v for k, v in GTE_RERANKER_CONFIG.items() if k not in ("model_type",)}
    config = ModernBertConfig.from_hf_config(HFModernBertConfig(**values))
    assert (config.num_layers, config.hidden_size, config.num_heads) == (22, 768, 12)
    assert config.head_dim == 64 and config.intermediate_size == 1152
    assert config.global_layers == tuple(i % 3 == 0 for i in range(22))
    assert config.window == 64  # local_attention 128: ±64 tokens
    assert (config.global_rope_theta, config.local_rope_theta) == (160000.0, 10000.0)
    assert config.pooling == "mean" and not config.norm_bias


def test_fixture_keeps_the_pattern_and_a_window_shorter_than_the_documents():
    """(Sequences within one window, which skip the mask, are checked at the kernel below.)"""
    config = ModernBertConfig.from_hf_config(AutoConfig.from_pretrained(_dir()))
    assert config.global_layers == (True, False, False, True)
    pairs, _ = _score(_model())
    lengths = [len(p) for p in pairs]
    assert sum(n > 4 * config.window for n in lengths) >= 4, lengths  # several windows long


@pytest.mark.parametrize("max_len", [128, None])
def test_token_ids_are_the_tokenizers_pair_encoding(max_len):
    """`[CLS] q [SEP] d [SEP]`, no token type ids (the tokenizer has none), the document cut
    at the end: `tokenizer(q, d, truncation="only_second")`."""
    model = _model(max_len=max_len)
    pairs, _ = _score(model)
    expected = _reference(max_len=max_len or 8192)
    assert [list(p.input_ids) for p in pairs] == [ids for ids, _ in expected]
    assert all(p.token_type_ids is None for p in pairs)
    tok = model.recipe.tokenizer
    assert pairs[0].input_ids[0] == tok.cls_token_id and pairs[0].input_ids[-1] == tok.sep_token_id
    full = [len(ids) for ids, _ in _reference(max_len=8192)]
    assert [p.truncated > 0 for p in pairs] == [max_len == 128 and n > 128 for n in full]


# --- float32 parity -------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("engine", ["packed", "transformers"])
def test_float32_scores_match_transformers(pooling, engine):
    _, scores = _score(_model(pooling, engine))
    expected = [raw for _, raw in _reference(pooling)]
    assert scores == pytest.approx(expected, abs=TOLERANCE_FP32)
    assert _order(scores) == _order(expected)
    assert max(expected) - min(expected) > 0.5, "fixture scores too flat to test ranking"


def test_long_documents_match_transformers():
    """Untruncated (up to the model's 8192 tokens): two pairs are longer than `CHUNK_SPAN`,
    so their local layers run in query chunks."""
    _, scores = _score(_model(max_len=None))
    expected = _reference(max_len=8192)
    assert sum(len(ids) > CHUNK_SPAN for ids, _ in expected) >= 2
    assert scores == pytest.approx([raw for _, raw in expected], abs=TOLERANCE_FP32)


def test_float32_scores_match_sentence_transformers_cross_encoder():
    """`CrossEncoder.predict` (batched and padded, no activation) on the same pairs, whose
    ids are its own `preprocess`'s; nothing is cut at the model's 8192 tokens, where its
    truncation and ours agree."""
    from sentence_transformers import CrossEncoder

    model = _model(max_len=None)
    pairs, scores = _score(model)
    cross_encoder = CrossEncoder(_dir(), device="cpu")
    for pair, document in zip(pairs, DOCUMENTS, strict=True):
        features = cross_encoder.preprocess([(QUERY, document)])
        assert features["input_ids"][0].tolist() == list(pair.input_ids)
        assert "token_type_ids" not in features
    inputs = [(QUERY, d) for d in DOCUMENTS]
    expected = cross_encoder.predict(inputs, activation_fn=torch.nn.Identity(), batch_size=4)
    assert scores == pytest.approx(expected.tolist(), abs=TOLERANCE_FP32)
    activated = cross_encoder.predict(inputs)  # its default activation: sigmoid
    assert [model.recipe.activate(s) for s in scores] == pytest.approx(activated, abs=1e-5)


def test_batch_composition_does_not_change_scores():
    model = _model()
    _, together = _score(model)
    alone = [_score(model, [d])[1][0] for d in DOCUMENTS]
    reverse = _score(model, DOCUMENTS[::-1])[1][::-1]
    assert together == pytest.approx(alone, abs=1e-5)
    assert together == pytest.approx(reverse, abs=1e-5)


def test_local_windows_matter_on_the_fixture():
    """The same weights with local layers seeing the whole sequence score the long pairs
    differently: the parity above really checks the window."""
    config = ModernBertConfig.from_hf_config(AutoConfig.from_pretrained(_dir()))
    pairs, _ = _score(_model())
    expected = [raw for _, raw in _reference()]
    for variant in (
        dataclasses.replace(config, window=10_000),
        dataclasses.replace(config, window=4),
    ):
        with open_checkpoint(Path(_dir())) as checkpoint:
            model = load_modernbert(checkpoint, variant, torch.float32, torch.device("cpu"))
        with torch.inference_mode():
            got = model(pack(pairs, None, torch.device("cpu"), share_prefix=False)).tolist()
        long = [i for i, p in enumerate(pairs) if len(p) > 2 * config.window + 1]
        assert max(abs(got[i] - expected[i]) for i in long) > 1e-2


# --- bf16 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["packed", "packed-sdpa", "transformers"])
def test_bf16_scores_within_tolerance_and_ranked_on_clear_gaps(engine):
    """`packed`: the engine's pick for bf16 (global layers: the AMX kernel on CPUs with AMX,
    the AVX512-BF16 one where it beats SDPA; oneDNN-prepacked linears); `packed-sdpa`: SDPA
    everywhere. Local layers run the band SDPA in both."""
    model = _model(engine=engine, dtype="bfloat16")
    _, raw = _score(model)
    _check_bf16(raw, [x for _, x in _reference()])
    if engine.startswith("packed"):
        picked = model.scheduler.engine.attention
        if engine == "packed-sdpa":
            assert picked == "sdpa"
        elif load_kernel() is not None:
            assert picked == "amx"
        else:  # AVX512-BF16 CPUs: its kernel where it is measured faster than SDPA here
            assert picked in ("sdpa", *cpu_backends()), picked
        prepacked = any(
            isinstance(m, PrepackedLinear) for m in model.scheduler.engine.model.modules()
        )
        assert prepacked == prepack_supported(torch.device("cpu"), torch.bfloat16)
        if prepacked:  # GeGLU: gelu(input) · gate in the two GEMMs' epilogues
            wi = model.scheduler.engine.model.layers[0].mlp.wi
            assert isinstance(wi, PrepackedGatedLinear) and wi.activation == "gelu"


def test_int8_scores_rank_like_the_reference_with_the_gated_projection_fused():
    """`--quantize int8`: the input ‖ gate projection becomes one int8 gated linear (gelu in
    the epilogue) whatever int8 path this CPU takes; scores stay near float32's."""
    settings = Settings(
        model=_dir("mean"), dtype="bfloat16", quantize="int8", max_model_len=128, device="cpu"
    )
    model = load_model(settings, Metrics())
    from rerankd.ops.quantize import Int8Linear

    # oneDNN W8A8 (this CPU's default int8 path) applies gelu in the gate GEMM's epilogue;
    # a plain int8 linear there means the split-and-activate pass came back
    assert not isinstance(model.scheduler.engine.model.layers[0].mlp.wi, Int8Linear)
    _, raw = _score(model)
    expected = [x for _, x in _reference()]
    scores, want = [sigmoid(x) for x in raw], [sigmoid(x) for x in expected]
    assert scores == pytest.approx(want, abs=0.1)
    assert _order(scores)[0] == _order(want)[0]


#: pairs that all fit in one local window (≤ 9 tokens): local layers take the global kernel
SHORT_QUERY = "city"
SHORT_DOCUMENTS = ["river", "", "music", "old", "new", "stone"]


@pytest.mark.parametrize("engine", ["packed", "packed-sdpa"])
def test_bf16_batches_within_one_window(engine, monkeypatch):
    model = _model(engine=engine, dtype="bfloat16")
    if model.scheduler.engine.attention != "sdpa":  # the global kernel, never the band path

        def band(*args):
            raise AssertionError("band SDPA ran on a batch within one window")

        monkeypatch.setattr(modernbert, "band_sdpa_attention", band)
    pairs, raw = _score(model, SHORT_DOCUMENTS, SHORT_QUERY)
    assert max(len(p) for p in pairs) <= 9, [len(p) for p in pairs]
    expected = reference.cross_encoder_reference(_dir(), SHORT_QUERY, SHORT_DOCUMENTS, 128)
    _check_bf16(raw, [x for _, x in expected])


def _check_bf16(raw: list[float], expected_raw: list[float]) -> None:
    scores = [sigmoid(x) for x in raw]
    expected = [sigmoid(x) for x in expected_raw]
    assert scores == pytest.approx(expected, abs=TOLERANCE_BF16)
    for i in range(len(expected)):
        for j in range(len(expected)):
            if expected[i] - expected[j] > CLEAR_GAP:
                assert scores[i] > scores[j], (i, j, scores, expected)


# --- kernels --------------------------------------------------------------------------------


def _band_reference(q, k, v, lengths, window, scale):
    """Dense attention per sequence with an explicit additive band mask (the math)."""
    out, start = [], 0
    for n in lengths:
        qi, ki, vi = (t[start : start + n].transpose(0, 1).float() for t in (q, k, v))
        idx = torch.arange(n)
        bias = torch.where((idx[:, None] - idx[None, :]).abs() <= window, 0.0, float("-inf"))
        weights = torch.softmax(qi @ ki.transpose(1, 2) * scale + bias, dim=-1)
        out.append((weights @ vi).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("bucket_tokens", [None, 50], ids=["one-bucket", "buckets"])
def test_band_sdpa_attention_is_the_banded_math(bucket_tokens, monkeypatch):
    """Sequences within one window, banded ones (padded buckets), and long ones in query
    chunks."""
    if bucket_tokens:
        monkeypatch.setattr(modernbert, "PADDED_BUCKET_TOKENS", bucket_tokens)
    gen = torch.Generator().manual_seed(0)
    # around window + 1 = 9 on both sides, and past CHUNK_SPAN (query chunks)
    lengths = [3, 9, 10, 40, 1, 25, CHUNK_SPAN + 1, 3 * CHUNK_SPAN - 7]
    pairs = [EncodedPair(tuple(range(n))) for n in lengths]
    batch = pack(pairs, None, torch.device("cpu"), share_prefix=False)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=gen) for _ in range(3))
    got = band_sdpa_attention(q, k, v, batch, 8, 0.25)
    assert torch.allclose(got, _band_reference(q, k, v, lengths, 8, 0.25), atol=1e-5)
