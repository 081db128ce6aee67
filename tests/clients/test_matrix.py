"""The client matrix: real client libraries, unmodified, against a real `rerankd serve` of
the bundled all-MiniLM-L6-v2, each pointed at it through its own documented base-URL
setting (tests/clients/README.md lists them).

Every library must return the same ranking and the same scores (to 1e-6) as rerankd's own
/v1/rerank for the same query and documents. The Jina wrappers (and Voyage's client, for
`truncation: false`) must put the server's error message into the exception they raise.
Each failure shows what the library sent and what it got back (tests/clients/proxy.py).
"""

from __future__ import annotations

import pytest

from .conftest import TOP_N, Expected, ProbeRuns, Served, Venv, require

#: probe -> what it checks: "scores" (relevance scores), "logits" (NVIDIA's ranking API:
#: raw scores), "error" (the server's error message reaches the raised exception)
KIND = {
    "cohere-v1": "scores",
    "cohere-v2": "scores",
    "langchain-cohere": "scores",
    "langchain-infinity": "scores",
    "langchain-jina": "scores",
    "langchain-jina-error": "error",
    "langchain-voyageai": "scores",
    "langchain-nvidia": "logits",
    "llamaindex-cohere": "scores",
    "llamaindex-jina": "scores",
    "llamaindex-jina-error": "error",
    "llamaindex-tei": "scores",
    "llamaindex-siliconflow": "scores",
    "llamaindex-voyageai": "scores",
    "llamaindex-nvidia": "logits",
    "haystack-cohere": "scores",
    "haystack-jina": "scores",
    "haystack-jina-error": "error",
    "haystack-tei": "scores",
    "voyageai": "scores",
    "voyageai-truncation-error": "error",
    "infinity-client": "scores",
    "litellm-cohere": "scores",
    "litellm-jina_ai": "scores",
    "litellm-hosted_vllm": "scores",
    "litellm-huggingface": "scores",
    "litellm-together_ai": "scores",
    "litellm-voyage": "scores",
    "litellm-infinity": "scores",
}

#: venv -> its probes. `rerankd` is the suite's own venv (the newest cohere SDK, from the
#: `test` extra); `latest` holds the newest release of every other library that installs
#: together; `legacy` holds those pinned against them: infinity-client (httpx<0.28) and
#: LlamaIndex's VoyageAIRerank (voyageai<0.4), with LangChain's InfinityRerank and
#: voyageai 0.3 beside them.
VENV_PROBES: dict[str, list[str]] = {
    "rerankd": ["cohere-v1", "cohere-v2"],
    "latest": [
        "cohere-v1",
        "cohere-v2",
        "langchain-cohere",
        "langchain-jina",
        "langchain-jina-error",
        "langchain-voyageai",
        "langchain-nvidia",
        "llamaindex-cohere",
        "llamaindex-jina",
        "llamaindex-jina-error",
        "llamaindex-tei",
        "llamaindex-siliconflow",
        "llamaindex-nvidia",
        "haystack-cohere",
        "haystack-jina",
        "haystack-jina-error",
        "haystack-tei",
        "voyageai",
        "voyageai-truncation-error",
        *[name for name in KIND if name.startswith("litellm-")],
    ],
    "legacy": [
        "langchain-infinity",
        "infinity-client",
        "llamaindex-voyageai",
        "voyageai",
        # not voyageai-truncation-error: voyageai 0.3 crashes on any error body whose `error`
        # is an object (fixed in 0.5); rerankd keeps one error shape (tests/clients/README.md)
    ],
}

CASES = [
    pytest.param(venv, probe, id=f"{venv}:{probe}")
    for venv, probes in VENV_PROBES.items()
    for probe in probes
]


def report(record: dict, served: Served) -> str:
    exchanges = served.recorder.of(record["name"])
    error = record.get("error") or "returned"
    lines = [f"probe {record['name']}: {error[:1500]}"]
    if record.get("results") is not None:
        lines.append(f"  library returned [index, score]: {record['results']}")
    lines.append("  requests the library made:" if exchanges else "  (no request reached rerankd)")
    lines += [e.describe() for e in exchanges]
    if record.get("traceback"):
        lines.append(record["traceback"][-2500:])
    return "\n".join(lines)


@pytest.mark.parametrize(("venv_name", "probe"), CASES)
def test_client(venv_name: str, probe: str, probe_runs: ProbeRuns, expected: Expected) -> None:
    venv = Venv(venv_name)
    require(venv)
    record = probe_runs.get(venv, probe, VENV_PROBES[venv_name])
    served = probe_runs.served
    why = report(record, served)
    kind = KIND[probe]

    if kind == "error":
        assert not record["ok"], f"the library raised nothing:\n{why}"
        refused = [e for e in served.recorder.of(probe) if e.status >= 400]
        assert refused, f"the server refused no request of this probe:\n{why}"
        body = refused[-1].response
        assert isinstance(body, dict) and isinstance(body.get("error"), dict), why
        message = body["error"]["message"]
        assert body.get("detail") == message, f"`detail` must repeat the message:\n{why}"
        assert message in record["error"], (
            f"the server's message {message!r} is not in the library's exception:\n{why}"
        )
        return

    assert record["ok"], why
    results = record["results"]
    assert len(results) == TOP_N, f"asked for the top {TOP_N}:\n{why}"
    want = expected.raw if kind == "logits" else expected.scores
    assert [i for i, _ in results] == expected.ranking[:TOP_N], f"ranking differs:\n{why}"
    for index, score in results:
        assert abs(score - want[index]) <= 1e-6, (
            f"document {index}: library {score!r}, rerankd's /v1/rerank {want[index]!r}\n{why}"
        )
