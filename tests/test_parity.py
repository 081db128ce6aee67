"""Engine parity: rerankd's scores equal the model-card reference scorers.

float32: |Δ| ≤ 1e-4 and identical ranking; bf16: |Δ| ≤ 2e-2; batch composition never
changes a float32 score beyond 1e-5.
"""

from __future__ import annotations

import itertools
import random
from functools import cache

import pytest
import torch

from rerankd.metrics import Metrics
from rerankd.ops import avx512_kernel
from rerankd.ops.amx_kernel import load_kernel
from rerankd.recipes import sigmoid
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch
from tests import reference
from tests.fixtures.paths import fixture_dir

QUERY = "what is the capital of china?"
DOCUMENTS = [
    "Beijing is the capital of China.",
    "Gravity is a force that attracts objects with mass.",
    "北京是中华人民共和国的首都。🎉",
    "The capital of France is Paris, a city on the Seine.",
    "",
    "yes no yes no maybe",
    "word " * 700,  # longer than every fixture limit below: exercises truncation
]

# family → (fixture, reference scorer, max_model_len given to rerankd and the reference)
FAMILIES = {
    "qwen3": ("qwen3", reference.qwen3_reference, 512),
    "qwen3-seq-cls": ("qwen3-seq-cls", reference.qwen3_seq_cls_reference, 512),
    "gemma": ("gemma", reference.bge_gemma_reference, 128),
    "xlmr": ("xlmr", reference.cross_encoder_reference, 128),
    "bert": ("bert", reference.cross_encoder_reference, 128),
}


#: every engine path that can serve a family ("packed-compiled": `--compile on`)
ENGINES = {
    "qwen3": ("packed", "packed-compiled", "transformers"),
    "qwen3-seq-cls": ("packed", "transformers"),
    "gemma": ("packed", "packed-compiled", "transformers"),
    "xlmr": ("packed", "transformers"),
    "bert": ("packed", "transformers"),
}
CASES = [(family, engine) for family, engines in ENGINES.items() for engine in engines]
#: bf16 also through each attention kernel forced ("packed-sdpa": `--attention sdpa`, ...):
#: `auto` keeps rerankd's CPU kernels only where they are timed faster than SDPA, so it may
#: pick any of them on a given machine
FORCED_ATTENTION = ("sdpa", "amx", "avx512")
BF16_CASES = CASES + [
    (family, f"packed-{kernel}")
    for kernel in FORCED_ATTENTION
    for family in ("qwen3", "gemma", "xlmr", "bert")
]
#: rerankd's CPU kernels that load on this machine (the AVX512-BF16 one also runs on AMX CPUs)
CPU_KERNELS = {"amx": load_kernel, "avx512": avx512_kernel.load_kernel}


@cache
def _model(name: str, dtype: str, max_len: int, engine: str = "auto"):
    compiled = engine == "packed-compiled"
    forced = engine.removeprefix("packed-") if engine.startswith("packed-") else None
    forced = forced if forced in FORCED_ATTENTION else None
    if forced in CPU_KERNELS and (dtype != "bfloat16" or CPU_KERNELS[forced]() is None):
        pytest.skip(f"rerankd's {forced} attention kernel does not run here")
    settings = Settings(
        model=str(fixture_dir(name)),
        dtype=dtype,
        max_model_len=max_len,
        device="cpu",
        engine=engine.split("-")[0],
        compile="on" if compiled else "off",
        attention=forced or "auto",
    )
    model = load_model(settings, Metrics())
    # the compiled path must really run: a silent fallback to eager would test nothing
    engine_ = model.scheduler.engine
    assert getattr(engine_, "compiled", False) == compiled
    # the same for a forced attention kernel; `auto` may keep one of the CPU kernels in bf16
    if engine_.name == "packed":
        kernels = [name for name, load in CPU_KERNELS.items() if load() is not None]
        allowed = kernels + ["sdpa"] if dtype == "bfloat16" else ["sdpa"]
        assert (engine_.attention == forced) if forced else (engine_.attention in allowed)
    return model


def _score(model, queries, documents, instruction=None, shared=False) -> tuple[list, list[float]]:
    """Score pairs in one batch; `shared` marks them as one request (prefix sharing on)."""
    pairs = model.recipe.encode(queries, documents, instruction)
    groups = [0] * len(pairs) if shared else None
    return pairs, model.scheduler.engine.score(Batch(pairs, groups))


def _ranking(scores) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


@cache
def _reference(family: str, query: str = QUERY) -> list[tuple[list[int], float]]:
    fixture, scorer, max_len = FAMILIES[family]
    return scorer(fixture_dir(fixture), query, DOCUMENTS, max_length=max_len)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_ids_equal_reference_including_truncation(family):
    fixture, _, max_len = FAMILIES[family]
    pairs, _ = _score(_model(fixture, "float32", max_len), [QUERY] * len(DOCUMENTS), DOCUMENTS)
    expected = [ids for ids, _ in _reference(family)]
    assert [list(p.input_ids) for p in pairs] == expected
    assert pairs[-1].truncated and not pairs[0].truncated
    assert len(pairs[-1]) <= max_len or family == "gemma"  # gemma's L excludes its prompt


@pytest.mark.parametrize(("family", "engine"), CASES)
@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared-prefix"])
def test_float32_scores_match_reference(family, engine, shared):
    fixture, _, max_len = FAMILIES[family]
    model = _model(fixture, "float32", max_len, engine)
    assert model.scheduler.engine.name == engine.removesuffix("-compiled")
    _, scores = _score(model, [QUERY] * len(DOCUMENTS), DOCUMENTS, shared=shared)
    expected = [raw for _, raw in _reference(family)]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert _ranking(scores) == _ranking(expected)
    assert max(expected) - min(expected) > 0.1, "fixture scores too flat to test ranking"


@pytest.mark.parametrize(("family", "engine"), BF16_CASES)
def test_bfloat16_scores_close_to_reference(family, engine):
    fixture, _, max_len = FAMILIES[family]
    model = _model(fixture, "bfloat16", max_len, engine)
    assert model.scheduler.engine.dtype == "bfloat16"
    _, raw = _score(model, [QUERY] * len(DOCUMENTS), DOCUMENTS, shared=True)
    # the tolerance applies to the scores clients get (activated, in [0, 1])
    scores = [sigmoid(x) for x in raw]
    expected = [sigmoid(x) for _, x in _reference(family)]
    assert scores == pytest.approx(expected, abs=2e-2)
    # identical ranking wherever the reference gap is clear
    for i in range(len(expected)):
        for j in range(len(expected)):
            if expected[i] - expected[j] > 0.05:
                assert scores[i] > scores[j], (i, j)


@pytest.mark.parametrize(("family", "engine"), CASES)
def test_batch_composition_does_not_change_scores(family, engine):
    """A pair scores the same alone, in its request's batch, or mixed with other requests."""
    fixture, _, max_len = FAMILIES[family]
    model = _model(fixture, "float32", max_len, engine)
    rng = random.Random(0)
    queries = [
        QUERY if i % 2 else f"query number {i} about cities" for i in range(len(DOCUMENTS) * 2)
    ]
    documents = DOCUMENTS * 2
    order = list(range(len(documents)))
    rng.shuffle(order)
    _, together = _score(model, [queries[i] for i in order], [documents[i] for i in order])
    # two requests in one batch, each sharing its own prefix
    groups = [0 if queries[i] == QUERY else 1 for i in order]
    pairs = model.recipe.encode([queries[i] for i in order], [documents[i] for i in order])
    grouped = model.scheduler.engine.score(Batch(pairs, groups))
    assert grouped == pytest.approx(together, abs=1e-5)
    for position, i in enumerate(order):
        _, alone = _score(model, [queries[i]], [documents[i]])
        assert together[position] == pytest.approx(alone[0], abs=1e-5)


def test_qwen3_instruction_changes_score_and_matches_reference():
    model = _model("qwen3", "float32", 512)
    instruction = "Find passages about geography"
    _, scores = _score(model, [QUERY] * 3, DOCUMENTS[:3], instruction)
    expected = reference.qwen3_reference(
        fixture_dir("qwen3"), QUERY, DOCUMENTS[:3], instruction=instruction, max_length=512
    )
    assert scores == pytest.approx([raw for _, raw in expected], abs=1e-4)
    assert scores != pytest.approx([raw for _, raw in _reference("qwen3")[:3]], abs=1e-3)


def test_gemma_instruction_replaces_prompt():
    model = _model("gemma", "float32", 128)
    prompt = "Does passage B answer query A? Say Yes or No."
    pairs, scores = _score(model, [QUERY] * 3, DOCUMENTS[:3], prompt)
    expected = reference.bge_gemma_reference(
        fixture_dir("gemma"), QUERY, DOCUMENTS[:3], prompt=prompt, max_length=128
    )
    assert [list(p.input_ids) for p in pairs] == [ids for ids, _ in expected]
    assert scores == pytest.approx([raw for _, raw in expected], abs=1e-4)


@pytest.mark.parametrize("fixture", ["xlmr", "bert"])
def test_cross_encoder_long_query_cut_to_three_quarters(fixture):
    """FlagEmbedding cuts a query longer than 3/4·L before fitting the document."""
    model = _model(fixture, "float32", 64)
    long_query = "capital city question " * 40
    pairs, scores = _score(model, [long_query] * 2, DOCUMENTS[:2])
    expected = reference.flag_cross_encoder_reference(
        fixture_dir(fixture), long_query, DOCUMENTS[:2], max_length=64
    )
    assert [list(p.input_ids) for p in pairs] == [ids for ids, _ in expected]
    assert scores == pytest.approx([raw for _, raw in expected], abs=1e-4)
    assert all(len(p) <= 64 and p.truncated for p in pairs)


def test_bert_pairs_carry_token_types():
    pairs, _ = _score(_model("bert", "float32", 128), [QUERY], [DOCUMENTS[0]])
    types = pairs[0].token_type_ids
    assert types is not None and types[0] == 0 and types[-1] == 1


@pytest.mark.parametrize("engine", ["packed", "packed-compiled"])
def test_token_chunks_do_not_change_scores(engine, monkeypatch):
    """Per-token work runs in chunks; chunk boundaries inside sequences change nothing."""
    import dataclasses

    from rerankd.models.decoder import token_chunks

    model = _model("qwen3", "float32", 512, engine)
    docs = DOCUMENTS + [f"document {i} about a city" for i in range(10)]
    _, whole = _score(model, [QUERY] * len(docs), docs, shared=True)
    decoder = model.scheduler.engine.model.decoder
    monkeypatch.setattr(decoder, "tokens", dataclasses.replace(decoder.tokens, chunk=37))
    pairs = model.recipe.encode([QUERY] * len(docs), docs)
    assert len(token_chunks(sum(len(p) for p in pairs), 37)) > 3
    _, chunked = _score(model, [QUERY] * len(docs), docs, shared=True)
    assert chunked == pytest.approx(whole, abs=1e-5)


@pytest.mark.parametrize(
    ("n", "size", "align"),
    [(1, 4096, 1), (4097, 4096, 1), (8192, 4096, 16), (4112, 4096, 16), (32, 10, 16), (48, 64, 16)],
)
def test_token_chunks_cover_the_stream_in_aligned_spans(n, size, align):
    from rerankd.models.decoder import token_chunks

    spans = token_chunks(n, size, align)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    lengths = [e - s for s, e in spans]
    assert min(lengths) > 1 or n == 1  # no empty span, no 1-token tail
    assert max(lengths) - min(lengths) <= align
    if n % align == 0:
        assert all(length % align == 0 for length in lengths)
        if size % align == 0:
            assert max(lengths) <= size


@pytest.mark.parametrize("family", ["qwen3", "qwen3-seq-cls", "gemma"])
def test_shared_prefix_equals_unshared_to_1e5(family):
    fixture, _, max_len = FAMILIES[family]
    model = _model(fixture, "float32", max_len, "packed")
    docs = DOCUMENTS + [f"document {i} about a city" for i in range(10)]
    _, unshared = _score(model, [QUERY] * len(docs), docs)
    _, shared = _score(model, [QUERY] * len(docs), docs, shared=True)
    assert shared == pytest.approx(unshared, abs=1e-5)


def test_identical_pairs_still_score_with_a_shared_prefix():
    """When one pair is a prefix of another, each keeps at least its last token unshared."""
    model = _model("qwen3", "float32", 512, "packed")
    docs = ["same text", "same text", "same text", "same text and more"]
    _, unshared = _score(model, [QUERY] * 4, docs)
    _, shared = _score(model, [QUERY] * 4, docs, shared=True)
    assert shared == pytest.approx(unshared, abs=1e-5)
    assert shared[0] == pytest.approx(shared[1], abs=1e-6)


@pytest.mark.parametrize("engine", ["packed", "packed-compiled"])
@pytest.mark.parametrize("rows", [16, 64])
def test_row_padding_does_not_change_scores(engine, rows, monkeypatch):
    """Padding the stream to a row multiple (oneDNN linears) changes no score, with one
    shared prefix, two, or none, and with chunk boundaries inside sequences."""
    import dataclasses

    model = _model("qwen3", "float32", 512, engine)
    decoder = model.scheduler.engine.model.decoder
    assert decoder.row_multiple == 1  # float32: plain linears, nothing to pad for
    docs = DOCUMENTS + [f"document {i} about a city" for i in range(9)]
    queries = [QUERY if i % 3 else "another query" for i in range(len(docs))]
    pairs = model.recipe.encode(queries, docs)
    groups = [0 if q == QUERY else 1 for q in queries]
    expected = [model.scheduler.engine.score(Batch(pairs, g)) for g in (groups, None)]
    monkeypatch.setattr(decoder, "row_multiple", rows)
    assert sum(len(p) for p in pairs) % rows, "the batch must need padding"
    for g, want in zip((groups, None), expected, strict=True):
        assert model.scheduler.engine.score(Batch(pairs, g)) == pytest.approx(want, abs=1e-5)
    monkeypatch.setattr(decoder, "tokens", dataclasses.replace(decoder.tokens, chunk=4 * rows))
    got = model.scheduler.engine.score(Batch(pairs, groups))
    assert got == pytest.approx(expected[0], abs=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_onednn_linears_pad_the_stream(dtype):
    """bf16 on CPU runs oneDNN-prepacked linears, which pad to a row multiple; float32 not."""
    from rerankd.ops.prepack import ONEDNN_ROW_MULTIPLE, PrepackedLinear, prepack_supported

    model = _model("qwen3", dtype, 512)
    packed = model.scheduler.engine.model
    prepacked = any(isinstance(m, PrepackedLinear) for m in packed.modules())
    assert prepacked == prepack_supported(torch.device("cpu"), getattr(torch, dtype))
    assert packed.decoder.row_multiple == (ONEDNN_ROW_MULTIPLE if prepacked else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_per_half_is_hf_rotate_half_bit_for_bit(dtype):
    """Our RoPE (half tables, one expression per half) against transformers' Llama RoPE
    (full tables, `q * cos + rotate_half(q) * sin`): the same roundings, so equal bits."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from rerankd.models.decoder import apply_rotary, rotary

    torch.manual_seed(0)
    positions, inv_freq = torch.randint(0, 4000, (37,)), torch.rand(32)
    q, k = torch.randn(37, 4, 64, dtype=dtype), torch.randn(37, 2, 64, dtype=dtype)
    cos, sin = rotary(positions, inv_freq, dtype)
    freqs = positions[:, None].float() * inv_freq[None, :]
    full = torch.cat((freqs, freqs), dim=-1)
    # HF layout: (batch, heads, T, D) with (batch, T, D) tables
    hf_q, hf_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None],
        full.cos().to(dtype)[None], full.sin().to(dtype)[None],
    )  # fmt: skip
    assert torch.equal(apply_rotary(q, cos, sin), hf_q[0].transpose(0, 1))
    assert torch.equal(apply_rotary(k, cos, sin), hf_k[0].transpose(0, 1))
