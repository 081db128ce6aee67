"""Late-interaction (ColBERT) reranking against PyLate, on tiny fixtures of both layouts.

Two references:
- PyLate itself (1.6.0 on sentence-transformers 5.3.0): its token ids and MaxSim scores on
  these fixtures, recorded by tests/recipes/colbert_golden.py into tests/data/colbert/
  pylate.json (PyLate's pins cannot share rerankd's venv; see that script);
- a scorer written here from PyLate's source (`ColBERT.tokenize` / `encode`,
  `scores.colbert_scores`) on transformers' tokenizer and AutoModel, padded, one text at a
  time, float32. It imports nothing from rerankd.
Fixtures: tests/fixtures/colbert.py (PyLate layout on BERT and ModernBERT, stanford layout on
XLM-R).
"""

from __future__ import annotations

import functools
import inspect
import json
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from starlette.testclient import TestClient
from transformers import AutoConfig, AutoModel, AutoTokenizer

from rerankd.api import create_app
from rerankd.engine.late_interaction import EmbeddingCache, maxsim
from rerankd.errors import InvalidRequest
from rerankd.metrics import Metrics
from rerankd.recipes import detect_recipe
from rerankd.runtime import build_service, load_model
from rerankd.settings import Settings
from rerankd.types import Batch
from tests.fixtures.colbert import build_colbert_bert, build_colbert_modernbert, build_colbert_xlmr
from tests.recipes.colbert_golden import DOCUMENTS, GOLDEN, QUERIES

BUILDERS = {
    "bert": build_colbert_bert,
    "xlmr": build_colbert_xlmr,
    "modernbert": build_colbert_modernbert,
}
#: the backbone each fixture runs on with `--engine auto` (ModernBERT: transformers')
BACKBONE = {"bert": "packed", "xlmr": "packed", "modernbert": "transformers"}
PYLATE = json.loads(GOLDEN.read_text(encoding="utf-8"))


@functools.cache
def fixture(name: str) -> Path:
    import tempfile

    return BUILDERS[name](Path(tempfile.mkdtemp(prefix=f"colbert-{name}-")))


@functools.cache
def served(
    name: str, engine: str = "auto", max_model_len: int | None = None, dtype: str = "float32"
):
    settings = Settings(
        model=str(fixture(name)),
        dtype=dtype,
        device="cpu",
        engine=engine,
        max_model_len=max_model_len,
    )
    return load_model(settings, Metrics())


def _score(model, queries, documents, **options):
    pairs = model.recipe.encode(queries, documents, **options)
    return pairs, model.scheduler.engine.score(Batch(pairs, [0] * len(pairs)))


def _all_pairs():
    return [q for q in QUERIES for _ in DOCUMENTS], DOCUMENTS * len(QUERIES)


# --- the reference written from PyLate's source -------------------------------------------------


class Reference:
    """PyLate 1.6's ColBERT on transformers: settings as `ColBERT.__init__` reads them."""

    def __init__(self, path: Path) -> None:
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        if (path / "artifact.metadata").is_file():  # stanford: settings and `linear`
            meta = json.loads((path / "artifact.metadata").read_text())
            self.prefixes = meta["query_token_id"], meta["doc_token_id"]
            self.lengths = meta["query_maxlen"], meta["doc_maxlen"]
            self.attend, self.expand = meta["attend_to_mask_tokens"], True
            self.skiplist = list(string.punctuation)
            self.dense = [(load_file(str(path / "model.safetensors"))["linear.weight"], None)]
        else:
            st = json.loads((path / "config_sentence_transformers.json").read_text())
            self.prefixes = st["query_prefix"], st["document_prefix"]
            self.lengths = st["query_length"], st["document_length"]
            self.attend, self.expand = st["attend_to_expansion_tokens"], st["do_query_expansion"]
            self.skiplist = st["skiplist_words"]
            weights = load_file(str(path / "1_Dense" / "model.safetensors"))
            self.dense = [(weights["linear.weight"], weights.get("linear.bias"))]
        self.tok.pad_token_id = self.tok.mask_token_id  # PyLate pads with [MASK]
        self.skip_ids = [self.tok.convert_tokens_to_ids(w) for w in self.skiplist]
        # sentence-transformers passes the features the model's forward takes
        self.inputs = set(inspect.signature(self.model.forward).parameters)
        self.encode = functools.cache(self.encode)  # each text encoded once per test session

    def tokenize(self, text: str, is_query: bool) -> dict:
        prefix = self.tok.convert_tokens_to_ids(self.prefixes[0 if is_query else 1])
        length = self.lengths[0 if is_query else 1]
        padding = "max_length" if is_query and self.expand else True
        features = self.tok(
            [text.strip()],  # sentence-transformers 5's Transformer.tokenize strips
            padding=padding,
            truncation="longest_first",
            max_length=length - 1,
            return_tensors="pt",
        )
        for key, value in (("input_ids", prefix), ("attention_mask", 1), ("token_type_ids", 0)):
            if key in features:
                t = features[key]
                features[key] = torch.cat([t[:, :1], torch.full_like(t[:, :1], value), t[:, 1:]], 1)
        if is_query and self.attend:
            features["attention_mask"].fill_(1)
        return features

    @torch.no_grad()
    def encode(self, text: str, is_query: bool) -> torch.Tensor:
        features = self.tokenize(text, is_query)
        x = self.model(**{k: v for k, v in features.items() if k in self.inputs})
        x = x.last_hidden_state[0]
        for weight, bias in self.dense:
            x = F.linear(x, weight, bias)
        ids = features["input_ids"][0]
        if is_query:
            keep = torch.ones_like(ids, dtype=torch.bool)
        else:
            keep = (
                ~torch.isin(ids, torch.tensor(self.skip_ids)) & features["attention_mask"][0].bool()
            )
        return F.normalize(x[keep], p=2, dim=1)

    def score(self, query: str, document: str) -> float:
        q, d = self.encode(query, True), self.encode(document, False)
        return float((q @ d.T).max(dim=1).values.sum())


@functools.cache
def reference(name: str) -> Reference:
    return Reference(fixture(name))


# --- detection ------------------------------------------------------------------------------------


def test_detected_from_pylate_and_stanford_files():
    for name, layout, prefixes, attend, dim in (
        ("bert", "pylate", ("[Q] ", "[D] "), False, 96),
        ("xlmr", "stanford", ("[QueryMarker]", "[DocumentMarker]"), True, 128),
        ("modernbert", "pylate", ("[Q] ", "[D] "), False, 128),
    ):
        path = fixture(name)
        config = AutoConfig.from_pretrained(path)
        assert detect_recipe(config, path).name == "colbert"
        assert detect_recipe(config).name == "colbert"  # the directory the config came from
        model = served(name)
        info = model.recipe.info
        assert (info.layout, info.query_prefix, info.document_prefix) == (layout, *prefixes)
        assert (info.query_length, info.document_length) == (32, 300)
        assert info.attend_to_expansion_tokens is attend and info.do_query_expansion
        assert model.recipe.max_length == 300
        engine = model.scheduler.engine
        assert (engine.name, engine.backbone) == ("late-interaction", BACKBONE[name])
        pair = model.recipe.encode(["q"], ["d"])[0]
        assert engine.embed([pair.query_ids], [len(pair.query_ids)])[0].shape[-1] == dim


def test_other_sentence_transformers_modules_are_not_colbert(tmp_path):
    path = fixture("bert")
    modules = json.loads((path / "modules.json").read_text())
    for file in ("config.json", "modules.json", "config_sentence_transformers.json"):
        (tmp_path / file).write_text((path / file).read_text())
    modules.append(
        {"idx": 2, "name": "2", "path": "2_Pooling", "type": "sentence_transformers.models.Pooling"}
    )
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(Exception, match="Transformer followed by Dense"):
        detect_recipe(AutoConfig.from_pretrained(tmp_path), tmp_path)


# --- parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_token_ids_equal_pylate(name):
    pairs, _ = _score(served(name), *_all_pairs())
    golden = PYLATE[name]
    for i, pair in enumerate(pairs):
        assert list(pair.query_ids) == golden["query_ids"][i // len(DOCUMENTS)], "query"
        assert list(pair.document_ids) == golden["document_ids"][i % len(DOCUMENTS)], i
    long = pairs[len(DOCUMENTS) - 1]
    assert len(long.document_ids) == 300 and long.truncated


@pytest.mark.parametrize(
    ("name", "engine"),
    [("bert", "auto"), ("bert", "transformers"), ("xlmr", "auto"), ("xlmr", "transformers")]
    + [("modernbert", "auto")],
)
def test_float32_maxsim_matches_pylate_to_1e4(name, engine):
    model = served(name, engine)
    assert model.scheduler.engine.backbone == (BACKBONE[name] if engine == "auto" else engine)
    _, scores = _score(model, *_all_pairs())
    expected = [s for row in PYLATE[name]["scores"] for s in row]
    assert scores == pytest.approx(expected, abs=1e-4)
    for q in range(len(QUERIES)):  # identical ranking to pylate.rank.rerank
        row = scores[q * len(DOCUMENTS) : (q + 1) * len(DOCUMENTS)]
        order = sorted(range(len(row)), key=lambda i: -row[i])
        assert order == PYLATE[name]["rerank"][q]


@pytest.mark.parametrize("name", ["bert", "xlmr"])
def test_bfloat16_prepacked_backbone_is_as_close_to_pylate_as_the_unpacked_one(name, monkeypatch):
    """bf16 on CPU runs oneDNN-prepacked linears (bias, GELU and residual on the float32
    accumulator): no further from PyLate's float32 scores than plain bf16 linears, within
    1 % of the scores' size, and the same order wherever PyLate's scores differ clearly."""
    from rerankd.engine import late_interaction
    from rerankd.ops.prepack import PrepackedLinear, prepack_supported

    if not prepack_supported(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this torch build has no oneDNN prepack")
    expected = torch.tensor([s for row in PYLATE[name]["scores"] for s in row])
    prepacked = served(name, dtype="bfloat16")
    assert any(
        isinstance(m, PrepackedLinear) for m in prepacked.scheduler.engine._backbone.model.modules()
    )
    monkeypatch.setattr(late_interaction, "prepack_linears", lambda *args, **kwargs: 0)
    plain = load_model(
        Settings(model=str(fixture(name)), dtype="bfloat16", device="cpu"), Metrics()
    )
    got = torch.tensor(_score(prepacked, *_all_pairs())[1])
    error = (got - expected).abs().max()
    plain_error = (torch.tensor(_score(plain, *_all_pairs())[1]) - expected).abs().max()
    assert error <= 1.25 * plain_error + 1e-3, (error, plain_error)
    bound = 1e-2 * expected.abs().max()
    assert error <= bound
    for i in range(len(expected)):  # pairs of one query's documents
        for j in range(len(expected)):
            same_query = i // len(DOCUMENTS) == j // len(DOCUMENTS)
            if same_query and expected[i] - expected[j] > 2 * bound:
                assert got[i] > got[j], (i, j)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_float32_maxsim_matches_the_reference_written_from_pylate(name):
    queries = [*QUERIES, "capital. of, France?!"]
    documents = [*DOCUMENTS, "  [Q] Beijing [D] !!!  ", "word " * 400]
    ref = reference(name)
    _, scores = _score(
        served(name), [q for q in queries for _ in documents], documents * len(queries)
    )
    expected = [ref.score(q, d) for q in queries for d in documents]
    assert scores == pytest.approx(expected, abs=1e-4)


def test_scores_are_raw_whatever_use_activation_says():
    recipe = served("bert").recipe
    for raw in (-3.5, 0.0, 27.25):
        assert recipe.activate(raw) == raw


# --- compute -----------------------------------------------------------------------------------------


def test_query_encoded_once_and_repeated_documents_come_from_the_cache(monkeypatch):
    model = served("bert")
    engine = model.scheduler.engine
    engine.cache.clear()
    seen: list[int] = []
    forward = engine._backbone.forward

    def counting(items, limited):
        seen.extend(len(ids) for ids, _ in items)
        return forward(items, limited)

    monkeypatch.setattr(engine._backbone, "forward", counting)
    documents = [DOCUMENTS[0], DOCUMENTS[1], DOCUMENTS[0], DOCUMENTS[2], DOCUMENTS[1]]
    _, first = _score(model, [QUERIES[0]] * len(documents), documents)
    assert len(seen) == 1 + 3  # the query once, each distinct document once
    assert first[0] == first[2] and first[1] == first[4]
    seen.clear()
    hits = engine.cache.hits
    _, second = _score(model, [QUERIES[1]] * len(documents), documents)
    assert len(seen) == 1  # only the new query: every document is cached
    assert engine.cache.hits - hits == 3
    expected = PYLATE["bert"]["scores"][1]
    assert second == pytest.approx([expected[i] for i in (0, 1, 0, 2, 1)], abs=1e-4)


def test_small_batch_budget_and_cold_cache_change_nothing(monkeypatch):
    engine = served("xlmr").scheduler.engine
    _, warm = _score(served("xlmr"), *_all_pairs())
    engine.cache.clear()
    monkeypatch.setattr(engine, "max_batch_tokens", 16)  # one sequence per forward
    _, cold = _score(served("xlmr"), *_all_pairs())
    assert cold == pytest.approx(warm, abs=1e-5)


def test_maxsim_is_the_per_document_loop():
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(7, 16, generator=gen), dim=-1)
    docs = [F.normalize(torch.randn(n, 16, generator=gen), dim=-1) for n in (1, 5, 12, 3)]
    expected = [float((q @ d.T).max(dim=1).values.sum()) for d in docs]
    assert maxsim(q, docs).tolist() == pytest.approx(expected, abs=1e-6)
    assert maxsim(q, [docs[0], docs[0][:0]]).tolist()[1] == 0.0


def test_cache_is_bounded_and_evicts_the_least_recently_used():
    cache = EmbeddingCache(max_rows=10)
    for key in range(4):
        cache.put((key,), torch.zeros(4, 2))
    assert len(cache) == 2 and cache.rows == 8
    assert cache.get((0,)) is None and cache.get((2,)) is not None
    cache.put((9,), torch.zeros(2, 2))  # 10 rows: fits
    cache.put((8,), torch.zeros(1, 2))  # evicts (3,), the least recently used
    assert cache.get((3,)) is None and cache.get((2,)) is not None
    cache.put((7,), torch.zeros(11, 2))  # larger than the whole cache: not kept
    assert cache.get((7,)) is None and cache.rows <= 10


# --- truncation ---------------------------------------------------------------------------------------


def test_truncate_false_names_the_document_or_the_query():
    recipe = served("bert").recipe
    with pytest.raises(InvalidRequest) as info:
        recipe.encode([QUERIES[0]] * 2, ["short", "word " * 400], truncate=False)
    assert info.value.param == "documents[1]" and "300" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        recipe.encode(["query " * 40], ["short"], truncate=False)
    assert info.value.param == "query"


def test_max_model_len_caps_the_document_length():
    model = served("bert", max_model_len=16)
    assert model.recipe.max_length == 16
    document = "word " * 40
    pair = model.recipe.encode([QUERIES[0]], [document])[0]
    # [CLS] [D] … [SEP]: 13 of the document's own tokens fit
    assert len(pair.document_ids) == 16
    assert pair.cut_tokens == len(model.recipe.encode_text(document)) - 13
    assert len(pair.query_ids) == 32  # the query keeps its own length (and expansion)


def test_left_truncation_keeps_the_end_of_the_document():
    recipe = served("bert").recipe
    document = "alpha " * 400 + "the capital of France"
    left = recipe.encode([QUERIES[0]], [document], side="left")[0]
    assert len(left.document_ids) == 300
    end = recipe.encode_text("the capital of France")
    assert list(left.document_ids[-1 - len(end) : -1]) == end
    assert left.document_ids[1] == recipe.document_prefix_id


# --- the service ---------------------------------------------------------------------------------------


def test_rerank_and_score_over_http_return_maxsim_sorted():
    service = build_service(Settings(model=str(fixture("xlmr")), dtype="float32", device="cpu"))
    expected = PYLATE["xlmr"]["scores"][0]
    with TestClient(create_app(service)) as client:
        models = client.get("/v1/models").json()["data"][0]
        assert models["recipe"] == "colbert"
        body = {"query": QUERIES[0], "documents": DOCUMENTS, "use_activation": True}
        results = client.post("/v1/rerank", json=body).json()["results"]
        assert [r["index"] for r in results] == PYLATE["xlmr"]["rerank"][0]
        for r in results:
            assert r["relevance_score"] == pytest.approx(expected[r["index"]], abs=1e-4)
        body = {"queries": QUERIES[0], "documents": DOCUMENTS[:3], "use_activation": False}
        data = client.post("/v1/score", json=body).json()["data"]
        assert [d["score"] for d in data] == pytest.approx(expected[:3], abs=1e-4)


def test_a_backbone_missing_tensors_is_refused_not_run_with_random_ones(tmp_path):
    """jina-colbert-v2's remote-code XLM-R (rotary, no position table) must not load into
    transformers' XLM-R with a fresh random table: neither backbone takes it."""
    import shutil

    from safetensors.torch import save_file

    from rerankd.errors import ModelLoadError

    path = tmp_path / "no-positions"
    shutil.copytree(fixture("xlmr"), path)
    weights = load_file(str(path / "model.safetensors"))
    del weights["roberta.embeddings.position_embeddings.weight"]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    settings = Settings(model=str(path), dtype="float32", device="cpu")
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(settings, Metrics())


def test_a_default_prompt_comes_before_every_query_and_document(tmp_path):
    import shutil

    path = tmp_path / "prompted"
    shutil.copytree(fixture("bert"), path)
    settings_file = path / "config_sentence_transformers.json"
    settings = json.loads(settings_file.read_text())
    settings.update(prompts={"search": "search: "}, default_prompt_name="search")
    settings_file.write_text(json.dumps(settings))
    config, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    from rerankd.recipes import build_recipe

    prompted = build_recipe(None, tok, config, None, model_dir=path)
    plain = served("bert").recipe
    assert prompted.info.prompt == "search: "
    pair = prompted.encode(["  capital  "], ["Beijing"])[0]
    expected = plain.encode(["search: capital"], ["search: Beijing"])[0]
    assert pair.input_ids == expected.input_ids
