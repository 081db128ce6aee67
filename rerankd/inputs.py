"""A request's inputs made ready for the scheduler: size estimates, image checks and
decoding, tokenization with its long-input options, and the per-request recipe options.

The service's helpers, kept apart so that service.py reads as admission → encode → score.
Everything here runs on plain values (strings, part tuples, recipes); nothing knows HTTP
or tensors. `encode_request` runs in a tokenizer worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from rerankd.errors import InvalidRequest
from rerankd.recipes import Recipe
from rerankd.recipes.chunking import encode_chunks
from rerankd.recipes.media import DecodedImage, MediaError, MediaPolicy, load_image
from rerankd.types import EncodedPair

#: characters per token assumed when estimating a request's size before tokenizing it
#: (English BPE averages ~4; a low estimate only admits a request the queue then refuses)
CHARS_PER_TOKEN_ESTIMATE = 4
#: tokens assumed per image before it is decoded (a 512x512 image is 256 merged patches)
TOKENS_PER_IMAGE_ESTIMATE = 256


@dataclass(frozen=True)
class LongInputs:
    """What a request asked for about documents that do not fit (see
    `RerankService.score_pairs`)."""

    truncate: bool = True
    side: str = "right"
    max_tokens_per_doc: int | None = None
    max_chunks_per_doc: int | None = None
    max_tokens_per_query: int | None = None
    max_prompt_tokens: int | None = None
    #: the layer a layerwise model scores after (the request's `cutoff_layers`; None: default),
    #: or a lightweight model's `Compression` (layer, head and compression; recipe-made)
    layer: int | None = None

    def encode(self, recipe: Recipe, queries, documents, instruction) -> list[list[EncodedPair]]:
        if self.max_tokens_per_query is not None:
            unique = [q for q in dict.fromkeys(queries) if isinstance(q, str)]
            cut, _ = recipe.cap_texts(unique, self.max_tokens_per_query, "right")
            as_cut = dict(zip(unique, cut, strict=True))
            queries = [as_cut.get(q, q) if isinstance(q, str) else q for q in queries]
        if self.max_prompt_tokens is None:
            return self._encode(recipe, queries, documents, instruction, self.max_tokens_per_doc)
        # vLLM's truncate_prompt_tokens: each query's documents get what its prompt leaves
        groups: list[list[EncodedPair] | None] = [None] * len(documents)
        for query in dict.fromkeys(queries):
            at = [i for i, q in enumerate(queries) if q == query]
            encoded = self._encode(
                recipe,
                [query] * len(at),
                [documents[i] for i in at],
                instruction,
                self._document_room(recipe, query, instruction),
            )
            for i, group in zip(at, encoded, strict=True):
                groups[i] = group
        return groups  # type: ignore[return-value]

    def _document_room(self, recipe: Recipe, query: str, instruction) -> int:
        """Document tokens that fit in `max_prompt_tokens` beside this query's prompt."""
        assert self.max_prompt_tokens is not None
        prompt = len(recipe.encode([query], [""], instruction)[0])
        room = self.max_prompt_tokens - prompt
        if room < 1:
            raise InvalidRequest(
                f"truncate_prompt_tokens={self.max_prompt_tokens} leaves no room for a "
                f"document: the prompt without one is already {prompt} tokens",
                param="truncate_prompt_tokens",
            )
        return min(room, self.max_tokens_per_doc or room)

    def _encode(
        self, recipe: Recipe, queries, documents, instruction, max_document_tokens: int | None
    ) -> list[list[EncodedPair]]:
        if self.max_chunks_per_doc is not None:
            return encode_chunks(
                recipe,
                queries,
                documents,
                instruction,
                self.truncate,
                max_chunks=self.max_chunks_per_doc,
                max_document_tokens=max_document_tokens,
            )
        pairs = recipe.encode(
            queries,
            documents,
            instruction,
            self.truncate,
            side=self.side,
            max_document_tokens=max_document_tokens,
        )
        return [[pair] for pair in pairs]


# --- size estimates (admission happens before any tokenizing) ---------------------------


def estimate_tokens(max_length: int, queries, documents, instruction) -> int:
    """Tokens the request will take, from character counts alone (no tokenizing): each
    pair counted up to the model's limit, plus a little for the prompt template."""
    extra = len(instruction or "")
    total = 0
    for query, document in zip(queries, documents, strict=True):
        chars = _chars(query) + _chars(document) + extra
        total += min(max_length, chars // CHARS_PER_TOKEN_ESTIMATE + 8)
    return total


def _chars(item) -> int:
    """Characters of a query or document (a string, or text and image parts), an image
    counted as `TOKENS_PER_IMAGE_ESTIMATE` tokens' worth."""
    if isinstance(item, str):
        return len(item)
    images = sum(1 for kind, _ in item if kind == "image")
    text = sum(len(value) for kind, value in item if kind == "text")
    return text + images * TOKENS_PER_IMAGE_ESTIMATE * CHARS_PER_TOKEN_ESTIMATE


def has_image(item) -> bool:
    return not isinstance(item, str) and any(kind == "image" for kind, _ in item)


def _input_names(queries) -> list[str]:
    """How errors name each query: `query` when the request has one, else `queries[i]`."""
    one_query = len({id(q) for q in queries}) == 1
    return ["query" if one_query else f"queries[{i}]" for i in range(len(queries))]


# --- images -------------------------------------------------------------------------------


def check_images(
    recipe: Recipe, model_name: str, queries, documents, max_chunks_per_doc
) -> tuple[list, list]:
    """A model that reads text only refuses image inputs (a 400 naming the first one); its
    image-free part tuples become their joined text. Chunking splits text only."""
    if getattr(recipe, "supports_images", False):
        if max_chunks_per_doc is not None:
            for index, document in enumerate(documents):
                if has_image(document):
                    raise InvalidRequest(
                        f"documents[{index}] holds an image; max_chunks_per_doc splits text "
                        "documents only",
                        param="max_chunks_per_doc",
                    )
        return list(queries), list(documents)

    def text_only(item, param: str):
        if isinstance(item, str):
            return item
        if has_image(item):
            raise InvalidRequest(
                f"{param} holds an image, but model {model_name!r} ({recipe.name}) "
                "reads text only; send text, or serve a multimodal reranker "
                "(e.g. Qwen/Qwen3-VL-Reranker-2B)",
                param=param,
            )
        return "".join(value for _, value in item)

    names = _input_names(queries)
    checked_queries = [text_only(q, name) for q, name in zip(queries, names, strict=True)]
    return checked_queries, [text_only(d, f"documents[{i}]") for i, d in enumerate(documents)]


def load_images(queries, documents, policy: MediaPolicy) -> tuple[list, list]:
    """Queries and documents with each image part's URL replaced by the decoded image
    (`DecodedImage`), each distinct URL decoded once per request, within the request's
    pixel budget; a bad image is a 400 naming its query or document."""
    if not any(map(has_image, queries)) and not any(map(has_image, documents)):
        return list(queries), list(documents)
    decoded: dict[str, DecodedImage] = {}
    pixels_left = policy.max_request_pixels

    def load(item, param: str):
        nonlocal pixels_left
        if isinstance(item, str):
            return item
        parts = []
        for kind, value in item:
            if kind == "image" and isinstance(value, str):
                if value not in decoded:
                    try:
                        image = load_image(value, policy, pixels_left)
                    except MediaError as exc:
                        raise InvalidRequest(f"{param}: {exc}", param=param) from exc
                    pixels_left -= image.width * image.height
                    decoded[value] = DecodedImage(image)
                value = decoded[value]
            parts.append((kind, value))
        return tuple(parts)

    seen: dict[int, object] = {}
    loaded_queries = []
    for query, name in zip(queries, _input_names(queries), strict=True):
        if id(query) not in seen:
            seen[id(query)] = load(query, name)
        loaded_queries.append(seen[id(query)])
    loaded = [load(d, f"documents[{i}]") for i, d in enumerate(documents)]
    return loaded_queries, loaded


# --- tokenizing ---------------------------------------------------------------------------


def encode_request(
    recipe: Recipe,
    queries,
    documents,
    instruction: str | None,
    options: LongInputs,
    *,
    max_query_tokens: int | None,
    media: MediaPolicy,
) -> list[list[EncodedPair]]:
    """Tokenize (per document: its pairs, more than one only when chunked); a tokenizer
    failure is a 400 naming the first document that fails.

    Texts that can never fit (an instruction or query longer than the model's limit, or
    than --max-query-tokens) are refused with bounded work, before full tokenization.
    Images are fetched and decoded first (this runs in a worker thread, never on the event
    loop); a bad one is a 400 naming its document."""
    queries, documents = load_images(queries, documents, media)
    _refuse_overlong(recipe, queries, instruction, max_query_tokens)
    try:
        groups = options.encode(recipe, queries, documents, instruction)
    except InvalidRequest:
        raise
    except Exception as exc:
        _name_the_failing_document(recipe, queries, documents, instruction, options)
        raise InvalidRequest(f"the request could not be tokenized: {exc}") from exc
    if options.layer is not None:  # a layerwise model's pairs, scored at another layer
        groups = [recipe.at_layer(group, options.layer) for group in groups]
    return groups


def _refuse_overlong(recipe: Recipe, queries, instruction, max_query_tokens) -> None:
    if instruction and recipe.count_tokens_upto(instruction, recipe.max_length) is None:
        raise InvalidRequest(
            f"the instruction is longer than this model's limit of {recipe.max_length} "
            "tokens; shorten it",
            param="instruction",
        )
    if max_query_tokens is None:
        return
    for query in dict.fromkeys(queries):
        if isinstance(query, str) and recipe.count_tokens_upto(query, max_query_tokens) is None:
            raise InvalidRequest(
                f"the query is longer than {max_query_tokens} tokens (--max-query-tokens)",
                param="query",
            )


def _name_the_failing_document(recipe, queries, documents, instruction, options) -> None:
    """Tokenize pair by pair (leniently) to raise a 400 naming the first that fails."""
    lenient = replace(options, truncate=True)
    for index, (query, document) in enumerate(zip(queries, documents, strict=True)):
        try:
            lenient.encode(recipe, [query], [document], instruction)
        except Exception as single:
            raise InvalidRequest(
                f"document {index} could not be tokenized: {type(single).__name__}: {single}",
                param=f"documents[{index}]",
            ) from single


# --- per-request recipe options -----------------------------------------------------------


def score_layer(
    recipe: Recipe,
    cutoff_layers: int | Sequence[int] | None,
    compress_ratio: int | None = None,
    compress_layers: Sequence[int] | None = None,
):
    """The layer a request's `cutoff_layers` asks a layerwise model to score after (None: the
    recipe's default), with compression options the recipe's options object; a 400 naming
    the field when it is invalid or the model has no per-layer heads or no compression."""
    compression = {
        name: value
        for name, value in (
            ("compress_ratio", compress_ratio),
            ("compress_layers", compress_layers),
        )
        if value is not None
    }
    if compression and not getattr(recipe, "compresses", False):
        name = next(iter(compression))
        raise InvalidRequest(
            f"{name} applies to token-compressing rerankers "
            "(bge-reranker-v2.5-gemma2-lightweight); this model does not compress",
            param=name,
        )
    if compression:
        return recipe.layer_of(cutoff_layers, **compression)
    if cutoff_layers is None:
        return None
    layer_of = getattr(recipe, "layer_of", None)
    if layer_of is None:
        raise InvalidRequest(
            "cutoff_layers applies to layerwise rerankers (bge-reranker-v2-minicpm-layerwise); "
            "this model has a single score head",
            param="cutoff_layers",
        )
    return layer_of(cutoff_layers)
