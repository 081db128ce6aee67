"""A JSON response rendered with orjson (fast, and strict: it never writes NaN), and the
shaping of a service `Ranking` into /v1/rerank's results and usage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from starlette.responses import Response

from rerankd.api.documents import echo
from rerankd.types import Ranking, ScoredPairs


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# --- shaping a ranking (routes, and the offline job, which writes /v1/rerank's lines) -------


def usage(answer: Ranking | ScoredPairs) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "total_tokens": answer.prompt_tokens,
        "truncated_documents": answer.truncated_documents,
    }


def rerank_results(
    ranking: Ranking,
    documents: Sequence[str | dict[str, Any]],
    texts: Sequence[str],
    return_documents: bool,
    as_string: bool = False,
) -> list[dict[str, Any]]:
    """`results` of /v1/rerank: `{index, document?, relevance_score}` best first; the
    document echoed exactly as sent, or (`as_string`, Infinity's clients) as its text."""
    results = []
    for index in ranking.order:
        item: dict[str, Any] = {"index": index}
        if return_documents:
            item["document"] = texts[index] if as_string else echo(documents[index])
        item["relevance_score"] = ranking.scores[index]
        results.append(item)
    return results
