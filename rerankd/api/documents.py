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


# --- text and images ---------------------------------------------------------------------
#
# A query or document with images reaches the service as a tuple of parts, in the order
# sent: ("text", str) or ("image", url), the url a data: URI or an http(s) URL (fetched and
# decoded later, off the event loop, by the service). Plain text stays a string, so text-only
# requests are unchanged. The shapes accepted:
# - vLLM's multimodal form: {"content": [{"type": "image_url", "image_url": {"url": ...}},
#   {"type": "text", "text": ...}, ...]}; as the whole `documents` field, each part is one
#   document (vLLM's score-input validation); as a list item or a query, one input whose
#   parts are joined by the model's recipe;
# - Jina m0's {"image": url} and {"text": ..., "image": url} (one input, text and image).

#: a query or document holding images: its parts, ("text", str) or ("image", url)
Parts = tuple[tuple[str, str], ...]
#: images one query or document may hold (each costs up to the model's pixel budget)
MAX_IMAGES_PER_INPUT = 16
#: parts one query or document may hold
MAX_PARTS_PER_INPUT = 64


def _image_url(part: dict[str, Any], where: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise InvalidRequest(
            f'{where} is an image_url part without a url string; send {{"type": "image_url", '
            '"image_url": {"url": "data:image/png;base64,..."}}',
            param=where,
        )
    return url


def _content_part(part: Any, where: str) -> tuple[str, str]:
    """One vLLM content part as ("text", text) or ("image", url)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return "text", part["text"]
    if kind == "image_url":
        return "image", _image_url(part, where)
    raise InvalidRequest(
        f"{where} is not a content part this server reads: send "
        '{"type": "text", "text": "..."} or {"type": "image_url", "image_url": {"url": "..."}}',
        param=where,
    )


def _checked(parts: list[tuple[str, str]], where: str) -> str | Parts:
    """The parts, within the caps; parts without an image are their texts joined (what every
    recipe reads the same way: the official VL code joins a side's texts with nothing)."""
    if len(parts) > MAX_PARTS_PER_INPUT:
        raise InvalidRequest(
            f"{where} has {len(parts)} content parts; at most {MAX_PARTS_PER_INPUT} are accepted",
            param=where,
        )
    images = sum(1 for kind, _ in parts if kind == "image")
    if images > MAX_IMAGES_PER_INPUT:
        raise InvalidRequest(
            f"{where} has {images} images; at most {MAX_IMAGES_PER_INPUT} per query or document",
            param=where,
        )
    if parts and not images:
        return "".join(text for _, text in parts)
    return tuple(parts)


def content_parts(content: Any, where: str) -> str | Parts:
    """A vLLM `content` list as one input's parts."""
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a list of content parts", param=where)
    return _checked(
        [_content_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)], where
    )


def _jina_parts(item: dict[str, Any], where: str) -> str | Parts:
    """Jina m0's {"image": url} / {"text": ..., "image": url}: the image, then the text."""
    images = item["image"] if isinstance(item["image"], list) else [item["image"]]
    if not images or not all(isinstance(url, str) and url for url in images):
        raise InvalidRequest(
            f"{where}.image must be an image URL or data: URI string", param=f"{where}.image"
        )
    parts = [("image", url) for url in images]
    text = item.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}.text must be a string", param=f"{where}.text")
        parts.append(("text", text))
    return _checked(parts, where)


def is_multimodal(item: Any) -> bool:
    """Whether a sent query or document uses a form that may hold images: a `content` list,
    or an `image` (a Cohere-style object whose `content` is a string stays text)."""
    return isinstance(item, dict) and (isinstance(item.get("content"), list) or "image" in item)


def document_input(
    document: str | dict[str, Any], index: int, rank_fields: list[str] | None = None
) -> str | Parts:
    """What to score for one document: its text (see `document_text`), or its parts when it
    is sent in a form that may hold images."""
    if is_multimodal(document) and not rank_fields:
        where = f"documents[{index}]"
        if isinstance(document.get("content"), list):
            return content_parts(document["content"], where)
        return _jina_parts(document, where)
    return document_text(document, index, rank_fields)


def document_inputs(
    documents: list[str | dict[str, Any]] | dict[str, Any], rank_fields: list[str] | None = None
) -> tuple[list[str | Parts], list[Any]]:
    """Every document's input, and the documents as sent (what results echo). A `documents`
    object {"content": [...]} is vLLM's multimodal form: each part is one document."""
    if isinstance(documents, dict):
        if "content" not in documents:
            raise InvalidRequest(
                'documents must be a list, or {"content": [...]} with one part per document',
                param="documents",
            )
        content = documents["content"]
        if not isinstance(content, list):
            raise InvalidRequest(
                "documents.content must be a list of content parts", param="documents"
            )
        # each part on its own (not `content_parts`: its per-input caps and the joining of
        # text-only parts are for one input; the document count is --max-documents')
        parts = [_content_part(part, f"documents.content[{i}]") for i, part in enumerate(content)]
        inputs = [value if kind == "text" else ((kind, value),) for kind, value in parts]
        return inputs, list(content)
    return [document_input(d, i, rank_fields) for i, d in enumerate(documents)], list(documents)


def query_input(
    query: str | dict[str, Any], param: str = "query", text_object: bool = False
) -> str | Parts:
    """A query: a string, vLLM's {"content": [...]} (all parts one query), or Jina's
    {"image": ...} / {"text": ..., "image": ...}; with `text_object` (/v1/score's query lists)
    also a {"text": ...} object."""
    if isinstance(query, str):
        return query
    if isinstance(query.get("content"), list):
        return content_parts(query["content"], param)
    if "image" in query:
        return _jina_parts(query, param)
    text = query.get("text")
    if not text_object or not isinstance(text, str):
        raise InvalidRequest(
            f"{param} must be a string"
            + (', {"text": ...}' if text_object else "")
            + ', or for a multimodal model {"content": [...]} or {"image": ...}',
            param=param,
        )
    return text


def input_text(item: str | Parts) -> str:
    """The text of an input (its text parts joined; images left out): for the response
    shapes that carry a document as a string (Voyage, Infinity, TEI)."""
    return item if isinstance(item, str) else "".join(v for k, v in item if k == "text")
