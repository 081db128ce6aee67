"""bge-reranker-v2-minicpm-layerwise against FlagEmbedding's `LayerWiseFlagLLMReranker`, on a
tiny MiniCPM fixture (tests/fixtures/minicpm_layerwise.py: 6 layers, heads after layers 2-6).

The reference is the package's own code: its `compute_score` (prompt, truncation, padding,
last-token pooling) over its own `LayerWiseMiniCPMForCausalLM`. Two shims let that model code
run on transformers 5, in this test only: transformers 5 turns the config's `rope_scaling:
null` into a dict the model code reads as a RoPE-scaling request (`KeyError: 'type'`), so
`rope_scaling` is set back to None; and the attention class is named ("eager") because
transformers 5 no longer sets `_attn_implementation` on a bare config. rerankd itself loads the
same directory as it would a hub download, and never runs the checkpoint's code (its
`auto_map` names files the fixture does not even have).

Token ids equal the ids FlagEmbedding feeds its model; raw scores equal its scores within
1e-4 (float32) after every layer that has a head, for the default (the last layer), a list
(the deepest listed layer answers) and the server's --cutoff-layers; requests with bad
`cutoff_layers` get a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from starlette.testclient import TestClient

from rerankd.api import create_app
from rerankd.errors import InvalidRequest, ModelLoadError
from rerankd.metrics import Metrics
from rerankd.models.loader import load_config_and_tokenizer
from rerankd.recipes import detect_recipe
from rerankd.recipes.bge_layerwise import BgeLayerwiseReranker
from rerankd.runtime import build_engine, build_service, load_recipe
from rerankd.service import RerankService, ServedModel
from rerankd.settings import Settings
from rerankd.types import Batch
from tests.fixtures.minicpm_layerwise import build_minicpm_layerwise

LAYERS = range(2, 7)  # the fixture's layers with a score head (start_layer 2, 6 layers)
QUERIES = ["what is panda?", "what is the capital of china?"]
DOCUMENTS = [
    "hi",
    "The giant panda is a bear species endemic to China.",
    "Beijing is the capital of China. 北京是中华人民共和国的首都。🎉",
    "",
    # long enough to be cut to FlagEmbedding's L = 512 passage tokens
    " ".join(f"panda bamboo forest {i} mountains of Sichuan." for i in range(160)),
]
PAIRS = [(q, d) for q in QUERIES for d in DOCUMENTS]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_minicpm_layerwise(tmp_path_factory.mktemp("minicpm-layerwise"))


# --- the reference ------------------------------------------------------------------------


def _reference_model(path):
    """FlagEmbedding's LayerWiseMiniCPMForCausalLM on `path`, with the two transformers-5 shims
    (see the module docstring); weights loaded strictly from the fixture's safetensors."""
    from FlagEmbedding.inference.reranker.decoder_only.models.configuration_minicpm_reranker import (  # noqa: E501
        LayerWiseMiniCPMConfig,
    )
    from FlagEmbedding.inference.reranker.decoder_only.models.modeling_minicpm_reranker import (
        LayerWiseMiniCPMForCausalLM,
    )

    values = json.loads((Path(path) / "config.json").read_text())
    values.pop("auto_map")
    config = LayerWiseMiniCPMConfig(**values)
    config.rope_scaling = None  # shim 1: transformers 5 made it {"rope_type": "default", ...}
    config._attn_implementation = "eager"  # shim 2: unset on a bare config in transformers 5
    model = LayerWiseMiniCPMForCausalLM(config)
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")), strict=True)
    return model.eval()


class _Reference:
    """`LayerWiseFlagLLMReranker` (float32, CPU) over the shimmed model, recording the token
    ids it feeds the model (unpadded)."""

    def __init__(self, path: Path) -> None:
        import FlagEmbedding as flag_embedding  # the test extra installs it: never skipped
        import FlagEmbedding.inference.reranker.decoder_only.layerwise as layerwise

        class Loader:
            from_pretrained = staticmethod(lambda p, **_: _reference_model(p))

        original = layerwise.LayerWiseMiniCPMForCausalLM
        layerwise.LayerWiseMiniCPMForCausalLM = Loader  # its from_pretrained call, shimmed
        try:
            self.reranker = flag_embedding.LayerWiseFlagLLMReranker(
                str(path), use_bf16=False, devices="cpu"
            )
        finally:
            layerwise.LayerWiseMiniCPMForCausalLM = original
        self.fed: set[tuple[int, ...]] = set()
        self.reranker.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, _args, kwargs):
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"], strict=True):
            self.fed.add(tuple(ids[mask.bool()].tolist()))

    @cache  # noqa: B019 (one instance per module)
    def scores(self, cutoff_layers: tuple[int, ...] | None = None) -> list:
        layers = None if cutoff_layers is None else list(cutoff_layers)
        return self.reranker.compute_score([list(p) for p in PAIRS], cutoff_layers=layers)


@pytest.fixture(scope="module")
def reference(model_dir) -> _Reference:
    return _Reference(model_dir)


# --- rerankd ------------------------------------------------------------------------------


class _Server:
    """A started service on its own event loop (its scheduler task lives there)."""

    def __init__(self, path: Path, **settings) -> None:
        self.service = build_service(
            Settings(model=str(path), device="cpu", dtype="float32", **settings)
        )
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.service.start())

    def raw(self, **options) -> list[float]:
        """Raw scores of PAIRS, one request per query (each shares its prompt prefix)."""

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


def _close(got: list[float], expected: list[float]) -> float:
    worst = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    assert worst <= TOLERANCE, f"max |Δ| {worst:.2e} > {TOLERANCE}: {got} vs {expected}"
    return worst


# --- detection and loading ---------------------------------------------------------------


def test_detected_from_config_without_its_remote_code(model_dir):
    assert "auto_map" in json.loads((model_dir / "config.json").read_text())
    assert not list(model_dir.glob("*.py"))  # nothing to run: loading must not try
    config, tokenizer = load_config_and_tokenizer(model_dir)
    assert type(config).__module__.startswith("transformers.")  # plain values, no remote class
    assert detect_recipe(config, model_dir) is BgeLayerwiseReranker
    assert tokenizer.bos_token_id == 1


def test_engine_is_the_packed_layerwise_one(server):
    served = server.service.models[0]
    assert type(served.scheduler.engine).__name__ == "LayerwiseEngine"
    assert served.recipe.default_layer == 6


def test_transformers_engine_is_refused(model_dir):
    settings = Settings(model=str(model_dir), device="cpu", dtype="float32", engine="transformers")
    _, config, recipe = load_recipe(settings)
    with pytest.raises(ModelLoadError, match="packed engine only"):
        build_engine("transformers", model_dir, config, recipe, "cpu", torch.float32, settings)


# --- parity with FlagEmbedding -----------------------------------------------------------


def test_token_ids_equal_flagembedding(server, reference):
    reference.scores()
    recipe = server.service.models[0].recipe
    ours = recipe.encode([q for q, _ in PAIRS], [d for _, d in PAIRS])
    assert {pair.input_ids for pair in ours} == reference.fed
    assert any(pair.truncated for pair in ours)  # the long document was cut, as there


@pytest.mark.parametrize("layer", LAYERS)
def test_scores_equal_flagembedding_at_each_layer(server, reference, layer):
    _close(server.raw(cutoff_layers=layer), reference.scores((layer,)))
    _close(server.raw(cutoff_layers=[layer]), reference.scores((layer,)))


def test_default_is_the_last_layer(server, reference):
    _close(server.raw(), reference.scores())
    _close(server.raw(), reference.scores((6,)))


def test_an_empty_instruction_is_flagembeddings_empty_prompt(server, reference):
    """`"instruction": ""` is the bare pair: FlagEmbedding's `prompt=""` (the ids end with the
    pair's "\\n"), not its default prompt (`prompt=None`)."""
    recorded = set(reference.fed)
    reference.fed.clear()
    try:
        bare = reference.reranker.compute_score([list(p) for p in PAIRS], prompt="")
        fed = set(reference.fed)
    finally:
        reference.fed.clear()
        reference.fed.update(recorded)
    recipe = server.service.models[0].recipe
    ours = recipe.encode([q for q, _ in PAIRS], [d for _, d in PAIRS], "")
    assert {pair.input_ids for pair in ours} == fed
    assert all(pair.input_ids[-len(recipe.sep_ids) :] == tuple(recipe.sep_ids) for pair in ours)
    _close(server.raw(instruction=""), bare)
    assert max(abs(a - b) for a, b in zip(bare, reference.scores(), strict=True)) > 1e-3


def test_a_list_scores_at_its_deepest_layer(server, reference):
    per_layer = reference.scores((3, 5))  # FlagEmbedding: one list per layer, ascending
    assert len(per_layer) == 2
    _close(server.raw(cutoff_layers=[3, 5]), per_layer[-1])
    _close(server.raw(cutoff_layers=[5, 3]), per_layer[-1])


def test_server_flag_sets_the_default_layer(model_dir, reference):
    flagged = _Server(model_dir, cutoff_layers=3)
    try:
        _close(flagged.raw(), reference.scores((3,)))
    finally:
        flagged.close()
    with pytest.raises(ModelLoadError, match="--cutoff-layers: layer 9 has no score head"):
        load_recipe(Settings(model=str(model_dir), cutoff_layers=9))


def test_shared_head_checkpoint(tmp_path):
    """head_multi false: one head read after every layer."""
    path = build_minicpm_layerwise(tmp_path / "shared", head_multi=False)
    reference, shared = _Reference(path), _Server(path)
    try:
        for layer in (2, 6):
            _close(shared.raw(cutoff_layers=layer), reference.scores((layer,)))
    finally:
        shared.close()


def test_pairs_at_different_layers_share_a_batch(server):
    """Concurrent requests at different layers land in one batch: each pair is scored after
    its own layer, exactly as alone."""
    served = server.service.models[0]
    recipe, engine = served.recipe, served.scheduler.engine
    pairs = recipe.encode([QUERIES[0]] * 3, DOCUMENTS[:3])
    mixed = [recipe.at_layer([p], layer)[0] for p, layer in zip(pairs, (2, 6, 4), strict=True)]
    alone = [engine.score(Batch([p]))[0] for p in mixed]
    together = engine.score(Batch(mixed, [0, 0, 1]))
    assert max(abs(a - b) for a, b in zip(alone, together, strict=True)) <= TOLERANCE


# --- the request field -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1, "layer 1 has no score head"),
        (7, "layer 7 has no score head"),
        ([2, 9], "layer 9 has no score head"),
        ([], "cutoff_layers is empty"),
        ("3", None),
        (3.5, None),
        (True, None),
        (["3"], None),
    ],
)
def test_bad_cutoff_layers_are_a_400_naming_the_field(client, value, message):
    for route, body in (
        ("/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
        ("/v1/score", {"queries": "q", "documents": ["a", "b"]}),
    ):
        response = client.post(route, json={**body, "cutoff_layers": value})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "cutoff_layers" in (error["param"] or "") + error["message"]
        if message:
            assert message in error["message"]
            assert "2 to 6" in error["message"] or "empty" in message


def test_good_cutoff_layers_answer_over_http(client, server):
    """The field reaches the engine: /v1/rerank at layer 3 gives the service's layer-3 score."""
    body = {"query": QUERIES[0], "documents": DOCUMENTS, "use_activation": False}
    at_3 = client.post("/v1/rerank", json={**body, "cutoff_layers": [2, 3]})
    assert at_3.status_code == 200, at_3.text
    scores = {r["index"]: r["relevance_score"] for r in at_3.json()["results"]}
    expected = server.raw(cutoff_layers=3)[: len(DOCUMENTS)]
    _close([scores[i] for i in range(len(DOCUMENTS))], expected)


def test_models_without_layers_refuse_the_field():
    class Recipe:  # any recipe without per-layer heads (no `layer_of`)
        max_length = 512

    service = RerankService([ServedModel("m", Recipe(), None)], Metrics())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="applies to layerwise rerankers") as info:
        asyncio.run(service.score_pairs(service.models[0], ["q"], ["d"], cutoff_layers=3))
    assert info.value.param == "cutoff_layers"
