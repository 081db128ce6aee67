"""Turning the documents clients send (strings, `{text}` objects, Cohere rank_fields) into text."""

from __future__ import annotations

from typing import Any

import orjson

from rerankd.errors import InvalidRequest


def document_text(
    document: str | dict[str, Any], index: int, rank_fields: list[str] | None = None
) -> str:
    """The text to score for one document; errors name the document's index."""
    if isinstance(document, str):
        return document
    if rank_fields:
        lines = []
        for key in rank_fields:
            if key not in document:
                raise InvalidRequest(
                    f"documents[{index}] has no field {key!r} named in rank_fields",
                    param=f"documents[{index}]",
                )
            value = document[key]
            lines.append(
                f"{key}: {value if isinstance(value, str) else orjson.dumps(value).decode()}"
            )
        return "\n".join(lines)
    text = document.get("text")
    if not isinstance(text, str):
        raise InvalidRequest(
            f"documents[{index}] is an object without a `text` string; send a string, "
            '{"text": "..."}, or name the fields to use with rank_fields',
            param=f"documents[{index}].text",
        )
    return text


def document_texts(
    documents: list[str | dict[str, Any]], rank_fields: list[str] | None = None
) -> list[str]:
    return [document_text(doc, i, rank_fields) for i, doc in enumerate(documents)]


def echo(document: str | dict[str, Any]) -> dict[str, Any]:
    """The document exactly as sent: objects as they are, strings as `{"text": ...}`."""
    return {"text": document} if isinstance(document, str) else document
