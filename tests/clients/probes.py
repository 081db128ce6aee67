"""Client-library probes: run inside a client venv (scripts/client-venvs.sh), never by pytest.

    python tests/clients/probes.py CONFIG.json NAME [NAME ...]

CONFIG.json holds {"url", "url_string", "model", "query", "documents", "top_n", "long_document"}:
`url` is the base URL of a rerankd (through the test's recording proxy), `url_string` one
started with `--rerank-document-format string`. For each NAME this script announces the
probe to the proxy (`POST {url}/__probe__/NAME`, so the proxy can file the requests that
follow under it), calls the library exactly as its documentation says, pointed at the
server through the library's own base-URL setting, and prints one line

    @@probe {"name", "ok", "results": [[index, score], ...] | null, "error": str | null}

`results` are in the order the library returned them. A probe whose name ends in
`-error` makes a request the server refuses and reports the exception the library raised.

The libraries are used as they are: nothing here patches them. Two of them have no base-URL
setting at all (tests/clients/README.md); those are reached through the `requests.Session`
they expose, with a transport adapter that sends their fixed https URL to the test server,
which leaves every line of the library's code in play.

Only the standard library and the probed libraries are imported (no rerankd, no pytest).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from typing import Any

# LiteLLM fetches its model price list from the internet on import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# keys the libraries insist on; the test server runs without authentication
for _key in ("COHERE_API_KEY", "CO_API_KEY", "JINA_API_KEY", "VOYAGE_API_KEY", "NVIDIA_API_KEY"):
    os.environ.setdefault(_key, "not-needed")

API_KEY = "not-needed"
#: a model name the server does not serve: the `-error` probes' request
UNKNOWN_MODEL = "no-such-model"


class Config:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.url: str = raw["url"].rstrip("/")
        self.url_string: str = raw["url_string"].rstrip("/")
        self.model: str = raw["model"]
        self.query: str = raw["query"]
        self.documents: list[str] = raw["documents"]
        self.top_n: int = raw["top_n"]
        self.long_document: str = raw["long_document"]

    def index_of(self, text: str) -> int:
        return self.documents.index(text)


Results = list[tuple[int, float]]
PROBES: dict[str, Callable[[Config], Results | None]] = {}


def probe(name: str):
    def register(fn: Callable[[Config], Results | None]):
        PROBES[name] = fn
        return fn

    return register


def reroute(fixed_base: str, target: str):
    """A requests transport adapter that sends requests for `fixed_base` (a library's
    hard-coded https URL) to `target`: requests' documented adapter mechanism."""
    from requests.adapters import HTTPAdapter

    class Reroute(HTTPAdapter):
        def send(self, request, **kwargs):
            request.url = target + request.url[len(fixed_base) :]
            return super().send(request, **kwargs)

    return Reroute()


# --- Cohere SDK -------------------------------------------------------------------------------


@probe("cohere-v1")
def cohere_v1(c: Config) -> Results:
    import cohere

    client = cohere.Client(base_url=c.url, api_key=API_KEY, timeout=60)
    response = client.rerank(model=c.model, query=c.query, documents=c.documents, top_n=c.top_n)
    return [(r.index, r.relevance_score) for r in response.results]


@probe("cohere-v2")
def cohere_v2(c: Config) -> Results:
    import cohere

    client = cohere.ClientV2(base_url=c.url, api_key=API_KEY, timeout=60)
    response = client.rerank(model=c.model, query=c.query, documents=c.documents, top_n=c.top_n)
    return [(r.index, r.relevance_score) for r in response.results]


# --- LangChain --------------------------------------------------------------------------------


def langchain_documents(c: Config) -> list:
    from langchain_core.documents import Document

    return [Document(page_content=text) for text in c.documents]


def from_langchain(c: Config, documents, key: str = "relevance_score") -> Results:
    return [(c.index_of(d.page_content), d.metadata[key]) for d in documents]


@probe("langchain-cohere")
def langchain_cohere(c: Config) -> Results:
    from langchain_cohere import CohereRerank

    reranker = CohereRerank(base_url=c.url, cohere_api_key=API_KEY, model=c.model, top_n=c.top_n)
    return from_langchain(c, reranker.compress_documents(langchain_documents(c), c.query))


@probe("langchain-infinity")
def langchain_infinity(c: Config) -> Results:
    from infinity_client import Client
    from langchain_community.document_compressors.infinity_rerank import InfinityRerank

    reranker = InfinityRerank(client=Client(base_url=c.url), model=c.model, top_n=c.top_n)
    return from_langchain(c, reranker.compress_documents(langchain_documents(c), c.query))


def langchain_jina_reranker(c: Config, model: str):
    from langchain_community.document_compressors import jina_rerank

    reranker = jina_rerank.JinaRerank(jina_api_key=API_KEY, model=model, top_n=c.top_n)
    # JINA_API_URL is a module constant: no base-URL setting (tests/clients/README.md);
    # `session` is the reranker's public requests.Session
    url = jina_rerank.JINA_API_URL
    reranker.session.mount(url, reroute(url, c.url + "/v1/rerank"))
    return reranker


@probe("langchain-jina")
def langchain_jina(c: Config) -> Results:
    reranker = langchain_jina_reranker(c, c.model)
    return from_langchain(c, reranker.compress_documents(langchain_documents(c), c.query))


@probe("langchain-jina-error")
def langchain_jina_error(c: Config) -> None:
    langchain_jina_reranker(c, UNKNOWN_MODEL).compress_documents(langchain_documents(c), c.query)


@probe("langchain-voyageai")
def langchain_voyageai(c: Config) -> Results:
    from langchain_voyageai import VoyageAIRerank

    reranker = VoyageAIRerank(model=c.model, api_key=API_KEY, base_url=c.url + "/v1", top_k=c.top_n)
    return from_langchain(c, reranker.compress_documents(langchain_documents(c), c.query))


@probe("langchain-nvidia")
def langchain_nvidia(c: Config) -> Results:
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    reranker = NVIDIARerank(base_url=c.url + "/v1", model=c.model, top_n=c.top_n)
    return from_langchain(c, reranker.compress_documents(langchain_documents(c), c.query))


# --- LlamaIndex -------------------------------------------------------------------------------


def llama_rerank(c: Config, postprocessor) -> Results:
    from llama_index.core.schema import NodeWithScore, TextNode

    nodes = [NodeWithScore(node=TextNode(text=text), score=0.0) for text in c.documents]
    ranked = postprocessor.postprocess_nodes(nodes, query_str=c.query)
    return [(c.index_of(n.node.get_content()), n.score) for n in ranked]


@probe("llamaindex-cohere")
def llamaindex_cohere(c: Config) -> Results:
    from llama_index.postprocessor.cohere_rerank import CohereRerank

    return llama_rerank(
        c, CohereRerank(api_key=API_KEY, model=c.model, top_n=c.top_n, base_url=c.url)
    )


def llamaindex_jina_reranker(c: Config, model: str):
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    return JinaRerank(api_key=API_KEY, model=model, top_n=c.top_n, base_url=c.url + "/v1")


@probe("llamaindex-jina")
def llamaindex_jina(c: Config) -> Results:
    return llama_rerank(c, llamaindex_jina_reranker(c, c.model))


@probe("llamaindex-jina-error")
def llamaindex_jina_error(c: Config) -> None:
    llama_rerank(c, llamaindex_jina_reranker(c, UNKNOWN_MODEL))


@probe("llamaindex-tei")
def llamaindex_tei(c: Config) -> Results:
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    return llama_rerank(
        c, TextEmbeddingInference(base_url=c.url, top_n=c.top_n, model_name=c.model)
    )


@probe("llamaindex-siliconflow")
def llamaindex_siliconflow(c: Config) -> Results:
    from llama_index.postprocessor.siliconflow_rerank import SiliconFlowRerank

    reranker = SiliconFlowRerank(
        model=c.model, api_key=API_KEY, base_url=c.url + "/v1/rerank", top_n=c.top_n
    )
    return llama_rerank(c, reranker)


@probe("llamaindex-voyageai")
def llamaindex_voyageai(c: Config) -> Results:
    import requests
    import voyageai
    from llama_index.postprocessor.voyageai_rerank import VoyageAIRerank

    # The constructor builds voyageai.Client(api_key) with no base URL, and voyageai reads
    # none from the environment (tests/clients/README.md). voyageai.requestssession is the
    # client library's module setting for the requests.Session it uses.
    session = requests.Session()
    voyage = "https://api.voyageai.com/v1"
    session.mount(voyage, reroute(voyage, c.url + "/v1"))
    voyageai.requestssession = session
    return llama_rerank(c, VoyageAIRerank(model=c.model, api_key=API_KEY, top_n=c.top_n))


@probe("llamaindex-nvidia")
def llamaindex_nvidia(c: Config) -> Results:
    from llama_index.postprocessor.nvidia_rerank import NVIDIARerank

    return llama_rerank(c, NVIDIARerank(base_url=c.url + "/v1", model=c.model, top_n=c.top_n))


# --- Haystack ---------------------------------------------------------------------------------


def haystack_rank(c: Config, ranker) -> Results:
    from haystack import Document

    if hasattr(ranker, "warm_up"):
        ranker.warm_up()
    documents = [Document(content=text) for text in c.documents]
    ranked = ranker.run(query=c.query, documents=documents)["documents"]
    return [(c.index_of(d.content), d.score) for d in ranked]


@probe("haystack-cohere")
def haystack_cohere(c: Config) -> Results:
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.cohere import CohereRanker

    ranker = CohereRanker(
        model=c.model, api_key=Secret.from_token(API_KEY), api_base_url=c.url, top_k=c.top_n
    )
    return haystack_rank(c, ranker)


def haystack_jina_ranker(c: Config, model: str):
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.jina import JinaRanker

    return JinaRanker(
        model=model,
        api_key=Secret.from_token(API_KEY),
        top_k=c.top_n,
        base_url=c.url + "/v1/rerank",
    )


@probe("haystack-jina")
def haystack_jina(c: Config) -> Results:
    return haystack_rank(c, haystack_jina_ranker(c, c.model))


@probe("haystack-jina-error")
def haystack_jina_error(c: Config) -> None:
    haystack_rank(c, haystack_jina_ranker(c, UNKNOWN_MODEL))


@probe("haystack-tei")
def haystack_tei(c: Config) -> Results:
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    return haystack_rank(c, HuggingFaceTEIRanker(url=c.url, top_k=c.top_n, max_retries=0))


# --- vendor clients ---------------------------------------------------------------------------


@probe("voyageai")
def voyageai_client(c: Config) -> Results:
    import voyageai

    client = voyageai.Client(api_key=API_KEY, base_url=c.url + "/v1", max_retries=0)
    response = client.rerank(c.query, c.documents, model=c.model, top_k=c.top_n)
    return [(r.index, r.relevance_score) for r in response.results]


@probe("voyageai-truncation-error")
def voyageai_truncation_error(c: Config) -> None:
    """Voyage's `truncation: false` on a document over the model's window: a refusal."""
    import voyageai

    client = voyageai.Client(api_key=API_KEY, base_url=c.url + "/v1", max_retries=0)
    client.rerank(c.query, [c.documents[0], c.long_document], model=c.model, truncation=False)


@probe("infinity-client")
def infinity_client(c: Config) -> Results:
    from infinity_client import Client
    from infinity_client.api.default import rerank
    from infinity_client.models import RerankInput

    body = RerankInput(
        query=c.query,
        documents=c.documents,
        model=c.model,
        top_n=c.top_n,
        return_documents=True,
    )
    response = rerank.sync_detailed(client=Client(base_url=c.url, timeout=60), body=body)
    if response.parsed is None or not hasattr(response.parsed, "results"):
        raise RuntimeError(f"HTTP {response.status_code}: {response.content[:500]!r}")
    for r in response.parsed.results:
        # Infinity's schema: the echoed document is the text itself
        if r.document != c.documents[r.index]:
            raise AssertionError(f"document {r.index} came back as {r.document!r}")
    return [(r.index, r.relevance_score) for r in response.parsed.results]


# --- LiteLLM ----------------------------------------------------------------------------------

#: provider -> (api_base, use the server started with `--rerank-document-format string`)
LITELLM_PROVIDERS: dict[str, tuple[str, bool]] = {
    "cohere": ("", False),
    "jina_ai": ("/v1", False),
    "hosted_vllm": ("", False),
    "huggingface": ("", False),
    "together_ai": ("", False),
    "voyage": ("/v1", False),
    "infinity": ("", True),
}


def litellm_probe(provider: str) -> Callable[[Config], Results]:
    def run(c: Config) -> Results:
        import litellm

        litellm.telemetry = False
        suffix, string_server = LITELLM_PROVIDERS[provider]
        response = litellm.rerank(
            model=f"{provider}/{c.model}",
            query=c.query,
            documents=c.documents,
            top_n=c.top_n,
            api_base=(c.url_string if string_server else c.url) + suffix,
            api_key=API_KEY,
            num_retries=0,
        )
        return [(r["index"], r["relevance_score"]) for r in response.results]

    return run


for _provider in LITELLM_PROVIDERS:
    probe(f"litellm-{_provider}")(litellm_probe(_provider))


# --- runner -----------------------------------------------------------------------------------


def announce(c: Config, name: str) -> None:
    request = urllib.request.Request(f"{c.url}/__probe__/{name}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        config = Config(json.load(f))
    for name in argv[2:]:
        started = time.monotonic()
        record: dict[str, Any] = {"name": name, "ok": False, "results": None, "error": None}
        try:
            announce(config, name)
            results = PROBES[name](config)
            if results is not None:
                record["results"] = [[int(i), float(s)] for i, s in results]
            record["ok"] = True
        except BaseException as exc:  # reported, never raised: the next probe still runs
            record["error"] = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
            record["traceback"] = traceback.format_exc(limit=-8)
        record["seconds"] = round(time.monotonic() - started, 3)
        print("@@probe " + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
