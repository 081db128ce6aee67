"""`"instruction": ""` for the instruction-aware text families (issue 20, "Beyond the peers":
a request may ask for the bare pair, and the effect is documented per family in the README).

What an empty instruction means follows each reference's own empty value, never the default:
- bge-reranker-v2-gemma (and the layerwise and lightweight models, tested in their modules):
  FlagEmbedding's ``prompt=""``: no prompt after the pair's "\\n", where ``None`` gives the
  default prompt;
- mxbai-rerank-v2 and jina-reranker-v3: their references put no instruction in the prompt by
  default, so an empty one is the default prompt;
- Qwen3-Reranker (tests/recipes/test_qwen3*) and st-causal (tests/recipes/test_st_causal.py)
  drop their `<Instruct>` line or system message.
"""

from __future__ import annotations

from functools import cache

import pytest

from rerankd.metrics import Metrics
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch
from tests import reference
from tests.fixtures.paths import fixture_dir

QUERY = "what is the capital of China?"
DOCUMENTS = [
    "Beijing is the capital of China.",
    "Paris is the capital of France.",
    "北京是中华人民共和国的首都。",
]


@cache
def _model(name: str, **settings):
    values = {"model": str(fixture_dir(name)), "device": "cpu", "dtype": "float32", **settings}
    return load_model(Settings(**values), Metrics())


def _score(model, instruction):
    pairs = model.recipe.encode([QUERY] * len(DOCUMENTS), DOCUMENTS, instruction)
    return pairs, model.scheduler.engine.score(Batch(pairs, None))


def test_bge_gemma_empty_instruction_is_flagembeddings_empty_prompt():
    model = _model("gemma", max_model_len=128)
    pairs, scores = _score(model, "")
    expected = reference.bge_gemma_reference(
        fixture_dir("gemma"), QUERY, DOCUMENTS, prompt="", max_length=128
    )
    assert [list(p.input_ids) for p in pairs] == [ids for ids, _ in expected]
    assert scores == pytest.approx([raw for _, raw in expected], abs=1e-4)
    default_pairs, default_scores = _score(model, None)
    sep = model.recipe.sep_ids
    assert [list(p.input_ids) for p in pairs] == [
        list(p.input_ids)[: len(p) - len(model.recipe.default_prompt_ids)] for p in default_pairs
    ]
    assert all(list(p.input_ids[-len(sep) :]) == sep for p in pairs)
    assert scores != pytest.approx(default_scores, abs=1e-3)


def test_mxbai_empty_instruction_is_the_packages_default_prompt():
    recipe = _model("mxbai-v2", recipe="mxbai-rerank-v2", max_model_len=512).recipe
    bare = recipe.encode([QUERY] * 3, DOCUMENTS, "")
    assert bare == recipe.encode([QUERY] * 3, DOCUMENTS, None)
    assert bare != recipe.encode([QUERY] * 3, DOCUMENTS, "Find geography passages")


def test_jina_v3_empty_instruction_is_the_references_default_prompt():
    from rerankd.models.loader import load_config_and_tokenizer
    from rerankd.recipes.jina_v3 import JinaV3Reranker

    config, tokenizer = load_config_and_tokenizer(fixture_dir("jina-v3"))
    recipe = JinaV3Reranker(tokenizer, config)
    ids = lambda instruction: [  # noqa: E731
        w.input_ids for w in recipe.encode_listing(QUERY, DOCUMENTS, instruction)[0].listing.windows
    ]
    assert ids("") == ids(None)
    assert ids("Find geography passages") != ids(None)
    assert "<instruct>" not in recipe.prompt(QUERY, DOCUMENTS, "")
