"""mxbai-rerank-v2 against the package `mxbai-rerank` (MxbaiRerankV2), on a tiny Qwen2 fixture.

Token ids equal the package's `prepare_inputs` (query cut to 3L/4, document to what is left,
~1,000-character documents, instructions); raw scores equal its `predict` within 1e-4 in
float32 on every engine (packed: Qwen2 with q/k/v biases; transformers), with and without
the shared prefix (vllm#22983 reports drift on exactly these inputs).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from rerankd.errors import ModelLoadError
from rerankd.metrics import Metrics
from rerankd.recipes import build_recipe, detect_recipe, sigmoid
from rerankd.recipes.mxbai import MxbaiRerankV2, is_mxbai_v2_download
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch
from tests import reference
from tests.fixtures.paths import fixture_dir
from tests.words import WORDS

QUERY = "what is the capital of china?"


def sentence(seed: int, chars: int) -> str:
    """A seeded English text of at most `chars` characters from the test vocabulary."""
    vocabulary = [word for word in WORDS if word.isascii()]
    words, i = [], seed
    while len(" ".join(words)) < chars - 12:
        words.append(vocabulary[(i * 7 + 3) % len(vocabulary)])
        i += seed + 1
    return " ".join(words)[:chars]


#: ~1,000-character documents (vllm#22983), short ones, an empty one, CJK and emoji
LONG = [sentence(i, 1000) for i in range(3)]
DOCUMENTS = [
    "Beijing is the capital of China.",
    "Gravity is a force that attracts objects with mass.",
    "北京是中华人民共和国的首都。🎉",
    "",
    "1 0 1 0 relevant",
    *LONG,
]
#: max_model_len → the package's max_length: 512 fits every document, 128 cuts the long ones
LENGTHS = (512, 128)
ENGINES = ("packed", "transformers")


def _dir() -> str:
    return str(fixture_dir("mxbai-v2"))


@cache
def _model(max_len: int, engine: str = "packed", dtype: str = "float32"):
    settings = Settings(
        model=_dir(),
        recipe="mxbai-rerank-v2",
        dtype=dtype,
        max_model_len=max_len,
        device="cpu",
        engine=engine,
    )
    return load_model(settings, Metrics())


@cache
def _reference(max_len: int, query: str = QUERY, instruction: str | None = None):
    return reference.mxbai_reference(_dir(), query, DOCUMENTS, instruction, max_length=max_len)


def _score(model, query=QUERY, documents=DOCUMENTS, instruction=None, shared=False, **kwargs):
    pairs = model.recipe.encode([query] * len(documents), documents, instruction, **kwargs)
    groups = [0] * len(pairs) if shared else None
    return pairs, model.scheduler.engine.score(Batch(pairs, groups))


def test_long_documents_are_about_a_thousand_characters():
    assert all(950 <= len(doc) <= 1000 for doc in LONG)


@pytest.mark.parametrize("max_len", LENGTHS)
@pytest.mark.parametrize("instruction", [None, "Find passages about geography"])
def test_token_ids_equal_the_package(max_len, instruction):
    pairs, _ = _score(_model(max_len), instruction=instruction)
    expected = _reference(max_len, instruction=instruction)
    assert [list(p.input_ids) for p in pairs] == [ids for ids, _ in expected]
    truncated = [p.truncated for p in pairs]
    assert truncated == [max_len == 128 and doc in LONG for doc in DOCUMENTS]


def test_long_query_is_cut_to_three_quarters_as_the_package_does():
    query = "capital city question " * 60
    pairs, scores = _score(_model(128), query=query, documents=DOCUMENTS[:3])
    expected = reference.mxbai_reference(_dir(), query, DOCUMENTS[:3], max_length=128)
    assert [list(p.input_ids) for p in pairs] == [ids for ids, _ in expected]
    assert scores == pytest.approx([raw for _, raw in expected], abs=1e-4)
    assert all(p.truncated for p in pairs)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("max_len", LENGTHS)
@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared-prefix"])
def test_float32_scores_match_the_package(engine, max_len, shared):
    model = _model(max_len, engine)
    assert model.scheduler.engine.name == engine
    _, scores = _score(model, shared=shared)
    expected = [raw for _, raw in _reference(max_len)]
    assert scores == pytest.approx(expected, abs=1e-4)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    assert order == sorted(range(len(expected)), key=lambda i: -expected[i])
    assert max(expected) - min(expected) > 0.1, "fixture scores too flat to test ranking"


def test_instruction_matches_the_package_and_changes_scores():
    instruction = "Find passages about geography"
    _, scores = _score(_model(512), instruction=instruction)
    expected = [raw for _, raw in _reference(512, instruction=instruction)]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert scores != pytest.approx([raw for _, raw in _reference(512)], abs=1e-3)


def test_head_is_one_minus_zero_and_activation_is_sigmoid():
    recipe = _model(512).recipe
    tok = recipe.tokenizer
    assert recipe.head.positive_token_id == tok.encode("1", add_special_tokens=False)[0]
    assert recipe.head.negative_token_id == tok.encode("0", add_special_tokens=False)[0]
    assert recipe.activate(0.7) == pytest.approx(sigmoid(0.7))


@pytest.mark.parametrize("engine", ENGINES)
def test_max_tokens_per_doc_above_every_document_changes_nothing(engine):
    """Truncation on tokens, once: a limit no document reaches leaves ids and scores as they
    were (vLLM re-tokenized and changed scores, vllm PR #57666)."""
    model = _model(512, engine)
    plain, scores = _score(model)
    capped, capped_scores = _score(model, max_document_tokens=100_000)
    assert [p.input_ids for p in capped] == [p.input_ids for p in plain]
    assert capped_scores == scores


def test_left_truncation_keeps_the_document_end_and_the_template():
    recipe = _model(128).recipe
    document = LONG[0]
    (right,) = recipe.encode([QUERY], [document])
    (left,) = recipe.encode([QUERY], [document], side="left")
    assert len(left) == len(right) and left.cut_tokens == right.cut_tokens > 0
    tail = recipe.tail_ids
    assert list(left.input_ids[-len(tail) :]) == tail
    text = recipe.tokenizer.decode(list(left.input_ids[: -len(tail)]))
    assert text.endswith(document[-40:]) and "document:" in text


def _checkpoint(path: Path) -> tuple:
    return AutoConfig.from_pretrained(path), path


def test_a_local_directory_needs_the_flag(tmp_path):
    config, path = _checkpoint(Path(_dir()))
    with pytest.raises(ModelLoadError, match="--recipe mxbai-rerank-v2"):
        detect_recipe(config, path)
    recipe = build_recipe(
        "mxbai-rerank-v2", AutoTokenizer.from_pretrained(path), config, 128, model_dir=path
    )
    assert isinstance(recipe, MxbaiRerankV2)


def test_a_hub_download_is_detected_by_its_repo_id(tmp_path):
    """The Hugging Face cache names the repo (`models--ORG--NAME/snapshots/REV`); a local
    directory named like it is not a download."""
    snapshot = tmp_path / "models--mixedbread-ai--mxbai-rerank-base-v2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for item in Path(_dir()).iterdir():
        (snapshot / item.name).symlink_to(item)  # as huggingface_hub lays files out
    assert detect_recipe(AutoConfig.from_pretrained(snapshot), snapshot) is MxbaiRerankV2
    assert is_mxbai_v2_download(tmp_path / "models--x--mxbai-rerank-large-v2" / "snapshots" / "r")
    named = tmp_path / "mxbai-rerank-base-v2"
    assert not is_mxbai_v2_download(named)
    assert not is_mxbai_v2_download(tmp_path / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "r")


def test_packed_engine_serves_qwen2_by_default():
    assert _model(128, "auto").scheduler.engine.name == "packed"


@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared-prefix"])
def test_bfloat16_packed_scores_with_prepacked_biased_qkv_stay_close_to_the_package(shared):
    """bf16 on CPU prepacks Qwen2's biased q ‖ k ‖ v projection too (the bias on oneDNN's
    accumulator, bit-identical to F.linear): scores within bf16's 2e-2 of the package's
    float32 ones, and as close as the transformers engine's own bf16."""
    import torch

    from rerankd.ops.prepack import PrepackedLinear, prepack_supported

    model = _model(512, "packed", "bfloat16")
    if prepack_supported(torch.device("cpu"), torch.bfloat16):
        wqkv = model.scheduler.engine.model.decoder.layers[0].self_attn.wqkv
        assert isinstance(wqkv, PrepackedLinear) and wqkv.bias is not None
    expected = torch.tensor([raw for _, raw in _reference(512)])
    ours = (torch.tensor(_score(model, shared=shared)[1]) - expected).abs().max()
    theirs = (
        (torch.tensor(_score(_model(512, "transformers", "bfloat16"))[1]) - expected).abs().max()
    )
    assert ours <= max(2e-2, 1.5 * theirs), (ours, theirs)
