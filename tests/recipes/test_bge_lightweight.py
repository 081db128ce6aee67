"""bge-reranker-v2.5-gemma2-lightweight against FlagEmbedding's `LightWeightFlagLLMReranker`, on a
tiny fixture (tests/fixtures/gemma2_lightweight.py: the real 42 layers, heads after 8..42,
hidden 32, sliding window 48).

The reference is the package's own `compute_score` over its own `CostWiseGemmaForCausalLM`,
which needs transformers 4.46 (its Gemma2 layers are called with 4.46's signature); its token
ids, query/prompt lengths and scores were recorded under transformers 4.46.3 into
tests/data/gemma2_lightweight/flagembedding.json by tests/recipes/lightweight_golden.py (float32
and bf16, every setting below). The fixture is rebuilt here and must hash to the recorded one.
The compression step itself (`token_compress`, which imports under transformers 5) is also
checked live. rerankd loads the directory as it would a hub download, and never runs the
checkpoint's code (its `auto_map` names files the fixture does not even have).

Token ids and layouts equal the reference's; raw scores equal its scores within 1e-4 (float32)
for every recorded (cutoff_layers, compress_ratio, compress_layers), through the service and
through /v1/rerank; bf16 as close to the float32 reference as FlagEmbedding's own bf16 is
(2e-2 is out of reach of both on 42 random layers: see the test), with the same ranking wherever
the float32 scores are clearly apart; bad options are a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient

from rerankd.api import create_app
from rerankd.errors import InvalidRequest, ModelLoadError
from rerankd.metrics import Metrics
from rerankd.models.gemma2_lightweight import _pool_passage
from rerankd.models.loader import load_config_and_tokenizer
from rerankd.recipes import detect_recipe
from rerankd.recipes.bge_lightweight import BgeLightweightReranker, Compression
from rerankd.runtime import build_engine, build_service, load_recipe
from rerankd.service import RerankService, ServedModel
from rerankd.settings import Settings
from rerankd.types import Batch
from tests.fixtures.paths import fixture_dir
from tests.recipes.lightweight_golden import (
    DOCUMENTS,
    GOLDEN,
    PAIRS,
    QUERIES,
    SETTINGS,
    fingerprint,
)

TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2
#: float32 reference scores this far apart must keep their order in bf16
CLEAR_GAP = 0.1


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return fixture_dir("gemma2-lightweight")


def _options(setting) -> dict:
    """A recorded setting as request fields (None cutoff: the reference's default, which is
    the last layer; the request says so explicitly, the server's default being the card's)."""
    cutoff, ratio, layers = setting
    return {"cutoff_layers": cutoff or [42], "compress_ratio": ratio, "compress_layers": layers}


def _expected(scores: list) -> list[float]:
    """The reference's answer for one setting: a list of lists (one per listed layer) answers
    with its deepest layer's, as rerankd does."""
    return scores[-1] if isinstance(scores[0], list) else scores


class _Server:
    """A started service on its own event loop (its scheduler task lives there)."""

    def __init__(self, path: Path, dtype: str = "float32", **settings) -> None:
        self.service = build_service(
            Settings(model=str(path), device="cpu", dtype=dtype, **settings)
        )
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.service.start())

    def raw(self, **options) -> list[float]:
        """Raw scores of PAIRS, one request per query."""

        async def run():
            model, raw = self.service.models[0], []
            for query in QUERIES:
                raw += (await self.service.rerank(model, query, DOCUMENTS, **options)).raw_scores
            return raw

        return self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.run_until_complete(self.service.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[_Server]:
    server = _Server(model_dir)
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(model_dir) -> Iterator[TestClient]:
    """The HTTP app over its own service on the real engine."""
    service = build_service(Settings(model=str(model_dir), device="cpu", dtype="float32"))
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        yield client


def _close(got: list[float], expected: list[float], tolerance: float = TOLERANCE) -> float:
    worst = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    assert worst <= tolerance, f"max |Δ| {worst:.2e} > {tolerance}: {got} vs {expected}"
    return worst


# --- detection, loading, the recording -------------------------------------------------------


def test_fixture_is_the_recorded_one(model_dir, golden):
    assert fingerprint(model_dir) == golden["fixture_sha256"], (
        "the fixture changed: re-record with `python -m tests.recipes.lightweight_golden`"
    )
    assert golden["transformers"] == "4.46.3"
    assert golden["attention"] == "sdpa"  # what FlagEmbedding's from_pretrained picks


def test_detected_from_config_without_its_remote_code(model_dir):
    assert "auto_map" in json.loads((model_dir / "config.json").read_text())
    assert not list(model_dir.glob("*.py"))  # nothing to run: loading must not try
    config, tokenizer = load_config_and_tokenizer(model_dir)
    assert type(config).__module__.startswith("transformers.")  # plain values, no remote class
    assert detect_recipe(config, model_dir) is BgeLightweightReranker
    assert tokenizer.bos_token_id == 2


def test_engine_and_defaults_are_the_model_cards(server):
    served = server.service.models[0]
    assert type(served.scheduler.engine).__name__ == "LightweightEngine"
    assert served.recipe.defaults == Compression(layer=28, head=0, ratio=2, layers=(24, 40))


def test_transformers_engine_is_refused(model_dir):
    settings = Settings(model=str(model_dir), device="cpu", dtype="float32", engine="transformers")
    _, config, recipe = load_recipe(settings)
    with pytest.raises(ModelLoadError, match="packed engine only"):
        build_engine("transformers", model_dir, config, recipe, "cpu", torch.float32, settings)


# --- parity with FlagEmbedding ----------------------------------------------------------------


def test_token_ids_and_layout_equal_flagembedding(server, golden):
    recipe = server.service.models[0].recipe
    ours = recipe.encode([q for q, _ in PAIRS], [d for _, d in PAIRS])
    fed = {tuple(f["input_ids"]): (f["query_length"], f["prompt_length"]) for f in golden["fed"]}
    assert {pair.input_ids: (pair.query_length, pair.prompt_length) for pair in ours} == fed
    assert any(pair.truncated for pair in ours)  # the long document was cut, as there


def test_an_instruction_replaces_the_prompt_and_its_length(server, golden):
    """FlagEmbedding's `prompt` argument: the ids end with "\\n" + the prompt, and the prompt
    part the model keeps uncompressed is that long."""
    recipe = server.service.models[0].recipe
    prompt = "Is passage B about query A?"
    default = recipe.encode([QUERIES[0]], [DOCUMENTS[1]])[0]
    asked = recipe.encode([QUERIES[0]], [DOCUMENTS[1]], instruction=prompt)[0]
    tail = recipe.encode_text("\n") + recipe.encode_text(prompt)
    assert asked.input_ids[-len(tail) :] == tuple(tail)
    assert asked.prompt_length == len(tail)
    assert asked.query_length == default.query_length
    body = len(default) - default.prompt_length
    assert asked.input_ids[:body] == default.input_ids[:body]


def test_an_empty_instruction_drops_the_prompt(server):
    """`"instruction": ""` is FlagEmbedding's `prompt=""`: the ids end with the pair's "\\n"
    and the uncompressed prompt part is that "\\n" alone (`prompt_lengths` = len(sep));
    the default prompt comes only with no instruction."""
    recipe = server.service.models[0].recipe
    default = recipe.encode([QUERIES[0]], [DOCUMENTS[1]])[0]
    bare = recipe.encode([QUERIES[0]], [DOCUMENTS[1]], instruction="")[0]
    sep = tuple(recipe.encode_text("\n"))
    assert bare.prompt_length == len(sep) and bare.input_ids[-len(sep) :] == sep
    assert bare.input_ids == default.input_ids[: len(default) - default.prompt_length + len(sep)]
    assert bare.query_length == default.query_length
    raw = server.raw(instruction="")
    assert max(abs(a - b) for a, b in zip(raw, server.raw(), strict=True)) > 1e-3


def test_default_request_is_the_model_cards_setting(server, golden):
    assert SETTINGS[0] == ([28], 2, [24, 40])
    _close(server.raw(), golden["float32"][0])


@pytest.mark.parametrize("index", range(len(SETTINGS)), ids=[str(s) for s in SETTINGS])
def test_scores_equal_flagembedding(server, golden, index):
    _close(server.raw(**_options(SETTINGS[index])), _expected(golden["float32"][index]))


def test_head_is_the_rank_of_the_cutoff_layer(server, golden):
    """The reference scores layer 28 with head 0 when asked for [28] and with head 1 when asked
    for [10, 28]: the same hidden state, two different scores."""
    alone = server.raw(cutoff_layers=28)
    listed = server.raw(cutoff_layers=[28, 10])
    _close(alone, golden["float32"][0])
    _close(listed, golden["float32"][SETTINGS.index(([10, 28], 2, [24, 40]))][-1])
    assert max(abs(a - b) for a, b in zip(alone, listed, strict=True)) > 0.1


def test_attention_is_not_soft_capped(server, golden):
    """FlagEmbedding's SDPA attention ignores Gemma2's attn_logit_softcapping; eager attention
    would cap it and score differently (the recording's eager run)."""
    ours = server.raw()
    assert _close(ours, golden["float32"][0]) < 1e-4
    eager = golden["float32_eager"][0]
    assert max(abs(a - b) for a, b in zip(ours, eager, strict=True)) > 1e-3


@pytest.mark.parametrize("index", [0, 1])
def test_bf16_is_close_and_keeps_clear_rankings(model_dir, golden, index):
    bf16 = _Server(model_dir, dtype="bfloat16")
    try:
        got = bf16.raw(**_options(SETTINGS[index]))
    finally:
        bf16.close()
    reference = golden["float32"][index]
    # 42 random-weight layers amplify bf16 rounding: FlagEmbedding's own bf16 run is 0.045 and
    # 0.052 from its float32 scores on these two settings (rerankd's: 0.030 to 0.036 on an AMX
    # Xeon, 0.048 on a Zen 4, whose oneDNN kernels round in another order), so the 2e-2 bound
    # is held against the float32 reference where bf16 noise allows it, else rerankd's bf16 must
    # be no farther from float32 than the reference's own bf16 is on either setting: the noise
    # is the fixture's depth, and which setting it lands on depends on the CPU
    own = max(
        max(abs(a - b) for a, b in zip(golden["bfloat16"][i], golden["float32"][i], strict=True))
        for i in (0, 1)
    )
    _close(got, reference, max(BF16_TOLERANCE, own))
    for q in range(len(QUERIES)):
        span = range(q * len(DOCUMENTS), (q + 1) * len(DOCUMENTS))
        for i in span:
            for j in span:
                if reference[i] - reference[j] > CLEAR_GAP:
                    assert got[i] > got[j], (i, j, got, reference)


def test_compression_pools_as_token_compress():
    """`_pool_passage`, per sequence, equals FlagEmbedding's batched `token_compress` (it imports
    under transformers 5: plain torch) on right-padded sequences of different layouts."""
    from FlagEmbedding.inference.reranker.decoder_only.models.gemma_model import token_compress

    gen = torch.Generator().manual_seed(0)
    layouts = [(5, 17, 4), (3, 0, 2), (7, 8, 3), (2, 1, 5)]  # (query, passage, prompt)
    longest = max(sum(layout) for layout in layouts) + 3
    hidden = torch.randn(len(layouts), longest, 8, generator=gen)
    mask = torch.zeros(len(layouts), longest, dtype=torch.long)
    for b, layout in enumerate(layouts):
        mask[b, : sum(layout)] = 1
    for ratio in (2, 3, 4, 8):
        queries = torch.tensor([q for q, _, _ in layouts])
        prompts = torch.tensor([p for _, _, p in layouts])
        reference, new_mask = token_compress(ratio, hidden, mask, queries, prompts)
        for b, (q, n, p) in enumerate(layouts):
            ours = _pool_passage(hidden[b, : q + n + p], q, p, ratio)
            assert len(ours) == int(new_mask[b].sum())
            torch.testing.assert_close(ours, reference[b, : len(ours)], rtol=0, atol=1e-6)


def test_server_flags_set_the_defaults(model_dir, golden):
    index = SETTINGS.index(([42], 4, [8]))
    flagged = _Server(model_dir, cutoff_layers=42, compress_ratio=4, compress_layers=["8"])
    try:
        _close(flagged.raw(), golden["float32"][index])
        # a request's fields still win over the flags
        _close(flagged.raw(**_options(SETTINGS[0])), golden["float32"][0])
    finally:
        flagged.close()
    for flags, message in (
        ({"cutoff_layers": 7}, "--cutoff-layers: layer 7 has no score head"),
        ({"compress_ratio": 0}, "--compress-ratio must be an integer >= 1"),
        ({"compress_layers": ["24,43"]}, "--compress-layers: layer 43 is not a layer"),
        ({"compress_layers": ["x"]}, "--compress-layers"),
    ):
        with pytest.raises(ModelLoadError, match=message):
            load_recipe(Settings(model=str(model_dir), **flags))


def test_pairs_with_different_options_share_a_batch(server):
    """Concurrent requests with different options land in one batch: each pair is scored as
    its own options say, exactly as alone."""
    served = server.service.models[0]
    recipe, engine = served.recipe, served.scheduler.engine
    pairs = recipe.encode([QUERIES[0]] * 4, DOCUMENTS[1:])
    options = [
        recipe.options(28, 2, [24, 40]),
        recipe.options([8, 42], 1, []),
        recipe.options(20, 8, [1, 9, 19]),
        recipe.options(42, 3, [30]),
    ]
    mixed = [recipe.at_layer([p], o)[0] for p, o in zip(pairs, options, strict=True)]
    alone = [engine.score(Batch([p]))[0] for p in mixed]
    together = engine.score(Batch(mixed, [0, 0, 1, 1]))
    assert max(abs(a - b) for a, b in zip(alone, together, strict=True)) <= TOLERANCE


# --- the request fields -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"cutoff_layers": 7}, "cutoff_layers", "layer 7 has no score head"),
        ({"cutoff_layers": [28, 43]}, "cutoff_layers", "layer 43 has no score head"),
        ({"cutoff_layers": []}, "cutoff_layers", "cutoff_layers is empty"),
        ({"cutoff_layers": "28"}, "cutoff_layers", None),
        ({"compress_ratio": 0}, "compress_ratio", "must be an integer >= 1"),
        ({"compress_ratio": -2}, "compress_ratio", "must be an integer >= 1"),
        ({"compress_ratio": 2.5}, "compress_ratio", None),
        ({"compress_ratio": True}, "compress_ratio", None),
        ({"compress_layers": [-1]}, "compress_layers", "layer -1 is not a layer"),
        ({"compress_layers": [24, 43]}, "compress_layers", "layer 43 is not a layer"),
        ({"compress_layers": 24}, "compress_layers", None),
        ({"compress_layers": ["24"]}, "compress_layers", None),
    ],
)
def test_bad_options_are_a_400_naming_the_field(client, fields, param, message):
    for route, body in (
        ("/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
        ("/v1/score", {"queries": "q", "documents": ["a", "b"]}),
    ):
        response = client.post(route, json={**body, **fields})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert param in (error["param"] or "") + error["message"]
        if message:
            assert message in error["message"]


def test_good_options_answer_over_http(client, golden):
    """The fields reach the engine: /v1/rerank answers each recorded setting's scores."""
    for index in (0, 7, 9):
        body = {"query": QUERIES[1], "documents": DOCUMENTS, "use_activation": False}
        response = client.post("/v1/rerank", json={**body, **_options(SETTINGS[index])})
        assert response.status_code == 200, response.text
        scores = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
        expected = _expected(golden["float32"][index])[len(DOCUMENTS) :]
        _close([scores[i] for i in range(len(DOCUMENTS))], expected)


def test_models_without_compression_refuse_the_fields():
    class Recipe:  # any recipe that does not compress (no `compresses`)
        max_length = 512

    service = RerankService([ServedModel("m", Recipe(), None)], Metrics())  # type: ignore[arg-type]
    for field in ("compress_ratio", "compress_layers"):
        value = 2 if field == "compress_ratio" else [24]
        with pytest.raises(InvalidRequest, match="applies to token-compressing") as info:
            asyncio.run(service.score_pairs(service.models[0], ["q"], ["d"], **{field: value}))
        assert info.value.param == field
