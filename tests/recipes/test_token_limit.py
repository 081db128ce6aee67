"""Truncation on tokens, once, for every text family (issue 20, "Beyond the peers").

vLLM re-tokenized documents when `max_tokens_per_doc` was set, and scores changed even where
nothing was cut (vllm PR #57666). rerankd cuts on the tokens it counted: a limit above every
document must leave every score bit-identical, whatever the family's recipe does to a text
(chat templates, prompts around the pair, a listwise prompt of all documents, layer cutoffs,
token compression). Each family is served through the service, as a /v1/rerank request is,
and the same limit one token short of the longest document must change that document's score
(the option reaches the recipe, so the equality is not vacuous).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rerankd.runtime import build_service
from rerankd.settings import Settings
from tests.fixtures.minicpm_layerwise import build_minicpm_layerwise
from tests.fixtures.modernbert import build_modernbert_cross_encoder
from tests.fixtures.paths import fixture_dir

QUERY = "what is the capital of China?"
#: texts whose decoding after a cut would not re-tokenize to themselves: runs of spaces, tabs
#: and newlines, accents and emoji, CJK, an empty one, and a long one
DOCUMENTS = [
    "Beijing is the capital of China.",
    "北京是中华人民共和国的首都。",
    "",
    "  spaced   out\ttext\n\nwith  breaks  ",
    "naïve café — “quoted” text 🎉🎉 e\u0301",
    " ".join(f"word{i} and more" for i in range(25)),
]


def _built(builder: Callable[[Path], Path]) -> Callable[[Path], Path]:
    return lambda tmp: builder(tmp / "model")


#: family → (checkpoint directory from a temporary directory, extra settings)
FAMILIES: dict[str, tuple[Callable[[Path], Path], dict]] = {
    "qwen3-reranker": (lambda _: fixture_dir("qwen3"), {}),
    "qwen3-seq-cls": (lambda _: fixture_dir("qwen3-seq-cls"), {}),
    "bge-gemma": (lambda _: fixture_dir("gemma"), {}),
    "xlmr-cross-encoder": (lambda _: fixture_dir("xlmr"), {}),
    "bert-cross-encoder": (lambda _: fixture_dir("bert"), {}),
    "mxbai-rerank-v2": (lambda _: fixture_dir("mxbai-v2"), {"recipe": "mxbai-rerank-v2"}),
    "st-causal-lm": (lambda _: fixture_dir("st-causal"), {}),
    "modernbert": (_built(build_modernbert_cross_encoder), {}),
    "bge-layerwise": (_built(build_minicpm_layerwise), {}),
    "bge-lightweight": (lambda _: fixture_dir("gemma2-lightweight"), {}),
    "jina-reranker-v3": (lambda _: fixture_dir("jina-v3"), {}),
}


class _Server:
    """A started service on its own event loop (its scheduler task lives there)."""

    def __init__(self, path: Path, **settings) -> None:
        values = {"model": str(path), "device": "cpu", "dtype": "float32", **settings}
        self.service = build_service(Settings(**values))
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.service.start())
        self.model = self.service.models[0]

    def raw(self, **options) -> list[float]:
        run = self.service.rerank(self.model, QUERY, DOCUMENTS, None, **options)
        return list(self.loop.run_until_complete(run).raw_scores)

    def tokens(self, text: str) -> int:
        return len(self.model.recipe.encode_text(text))

    def close(self) -> None:
        self.loop.run_until_complete(self.service.stop())
        self.loop.close()


@pytest.fixture(scope="module", params=list(FAMILIES))
def server(request, tmp_path_factory) -> Iterator[_Server]:
    make_dir, settings = FAMILIES[request.param]
    server = _Server(make_dir(tmp_path_factory.mktemp(request.param)), **settings)
    yield server
    server.close()


def test_a_limit_above_every_document_changes_no_score(server):
    plain = server.raw()
    longest = max(server.tokens(d) for d in DOCUMENTS)
    assert server.raw(max_tokens_per_doc=longest + 1) == plain
    assert server.raw(max_tokens_per_doc=100_000) == plain
    cut = server.raw(max_tokens_per_doc=longest - 1)
    assert cut[-1] != plain[-1], "the limit did not reach the longest document"
