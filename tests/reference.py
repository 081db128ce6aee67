"""Reference scorers: the correctness oracle the product must match.

Written straight from the model cards / the official inference code with plain transformers,
float32, ONE PAIR AT A TIME (no padding, no batching, no prefix sharing, no partial heads), and
deliberately independent of the product code (nothing from ``rerankd`` is imported).

Every scorer returns, per document, ``(input_ids, raw_score)``. The activated score is
``sigmoid(raw_score)`` for all recipes (for Qwen3, ``softmax([no, yes])[yes] == sigmoid(yes - no)``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

__all__ = [
    "BGE_GEMMA_DEFAULT_PROMPT",
    "QWEN3_DEFAULT_INSTRUCTION",
    "QWEN3_PREFIX",
    "QWEN3_SUFFIX",
    "bge_gemma_reference",
    "cross_encoder_reference",
    "flag_cross_encoder_reference",
    "mxbai_reference",
    "qwen3_reference",
    "qwen3_reference_ids",
    "qwen3_seq_cls_reference",
    "sigmoid",
    "st_causal_reference",
]

# --- Qwen3-Reranker model card ---------------------------------------------------------------
QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_DEFAULT_INSTRUCTION = (
    "Given a web search query, retrieve relevant passages that answer the query"
)

# --- bge-reranker-v2-gemma / FlagEmbedding BaseLLMReranker -----------------------------------
BGE_GEMMA_DEFAULT_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the "
    "query by providing a prediction of either 'Yes' or 'No'."
)

Result = list[tuple[list[int], float]]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _key(model_dir) -> str:
    return str(Path(model_dir).resolve())


@functools.cache
def _tokenizer(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir)


@functools.cache
def _plain_backend(model_dir: str) -> Tokenizer:
    """A private copy of the ``tokenizers.Tokenizer`` without truncation/padding state (the
    transformers wrapper leaves per-call truncation settings on its shared backend)."""
    backend = Tokenizer.from_str(_tokenizer(model_dir).backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


@functools.cache
def _causal_lm(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@functools.cache
def _seq_cls(model_dir: str):
    return AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------
# Qwen3-Reranker (Qwen3ForCausalLM) — model card "Transformers Usage"
# ---------------------------------------------------------------------------------------------


def _format_instruction(instruction: str | None, query: str, doc: str) -> str:
    # model card: format_instruction(instruction, query, doc)
    if instruction is None:
        instruction = QWEN3_DEFAULT_INSTRUCTION
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


def qwen3_reference_ids(
    model_dir, query: str, document: str, instruction: str | None = None, max_length: int = 8192
) -> list[int]:
    """Token ids of one (query, document) pair exactly as the Qwen3-Reranker card builds them."""
    tokenizer = _tokenizer(_key(model_dir))
    prefix_tokens = tokenizer.encode(QWEN3_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(QWEN3_SUFFIX, add_special_tokens=False)
    pair = _format_instruction(instruction, query, document)
    # model card: process_inputs(pairs), with a one-element batch.
    inputs = tokenizer(
        [pair],
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
    )
    return prefix_tokens + list(inputs["input_ids"][0]) + suffix_tokens


def qwen3_reference(
    model_dir,
    query: str,
    documents: Sequence[str],
    instruction: str | None = None,
    max_length: int = 8192,
) -> Result:
    """Qwen3-Reranker: raw = logits[-1, "yes"] - logits[-1, "no"] of the full causal-LM forward.

    ``token_true_id``/``token_false_id`` come from ``convert_tokens_to_ids("yes"/"no")`` as in
    the card; the card's score is ``softmax([no, yes])[yes] == sigmoid(raw)``.
    """
    key = _key(model_dir)
    tokenizer = _tokenizer(key)
    model = _causal_lm(key)
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    out: Result = []
    with torch.inference_mode():
        for doc in documents:
            ids = qwen3_reference_ids(key, query, doc, instruction, max_length)
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, :]
            raw = (logits[token_true_id] - logits[token_false_id]).item()
            out.append((ids, raw))
    return out


def qwen3_seq_cls_reference(
    model_dir,
    query: str,
    documents: Sequence[str],
    instruction: str | None = None,
    max_length: int = 8192,
) -> Result:
    """Converted Qwen3 (``Qwen3ForSequenceClassification``, one label): the same prompt ids as
    :func:`qwen3_reference`; raw = the classifier logit.

    transformers' ``Qwen3ForSequenceClassification`` (``GenericForSequenceClassification``)
    pools the *rightmost token that is not ``pad_token_id``*; with one unpadded sequence whose
    suffix ends in ``"\\n\\n"`` that is the last token (asserted below).
    """
    key = _key(model_dir)
    tokenizer = _tokenizer(key)
    model = _seq_cls(key)
    pad_id = model.config.pad_token_id
    out: Result = []
    with torch.inference_mode():
        for doc in documents:
            ids = qwen3_reference_ids(key, query, doc, instruction, max_length)
            assert ids[-1] != pad_id, "pooled token would not be the last one"
            assert ids[-1] != tokenizer.pad_token_id
            logits = model(input_ids=torch.tensor([ids])).logits
            out.append((ids, logits[0, 0].item()))
    return out


# ---------------------------------------------------------------------------------------------
# bge-reranker-v2-gemma (GemmaForCausalLM) — FlagEmbedding BaseLLMReranker
# (FlagEmbedding/inference/reranker/decoder_only/base.py, compute_score_single_gpu)
# ---------------------------------------------------------------------------------------------


def _truncate_only_second(first: list[int], second: list[int], max_length: int, side: str):
    """``tokenizer.prepare_for_model(first, second, truncation='only_second',
    max_length=max_length, add_special_tokens=False)`` done by hand: transformers 5 fast
    tokenizers have no ``prepare_for_model``. Mirrors ``truncate_sequences`` ONLY_SECOND."""
    num_tokens_to_remove = len(first) + len(second) - max_length
    if num_tokens_to_remove <= 0:
        return first, second
    # transformers 4 logs an error and leaves the pair untouched when the second sequence is too
    # short; with the bge recipe that cannot happen (the query is capped at 3/4 of max_length).
    assert len(second) > num_tokens_to_remove, "only_second truncation impossible"
    if side == "right":
        return first, second[:-num_tokens_to_remove]
    return first, second[num_tokens_to_remove:]


def bge_gemma_reference_ids(
    model_dir, query: str, passage: str, prompt: str | None = None, max_length: int = 512
) -> list[int]:
    tokenizer = _tokenizer(_key(model_dir))
    if prompt is None:
        prompt = BGE_GEMMA_DEFAULT_PROMPT
    # prompt_inputs = self.tokenizer(prompt, return_tensors=None, add_special_tokens=False)['input_ids']
    prompt_inputs = tokenizer(prompt, return_tensors=None, add_special_tokens=False)["input_ids"]
    # sep = "\n"; sep_inputs = self.tokenizer(sep, ..., add_special_tokens=False)['input_ids']
    sep_inputs = tokenizer("\n", return_tensors=None, add_special_tokens=False)["input_ids"]
    # encode_max_length = max_length + len(sep_inputs) + len(prompt_inputs)
    encode_max_length = max_length + len(sep_inputs) + len(prompt_inputs)
    # query_max_length = max_length * 3 // 4 (when not given); query_instruction "A: " with
    # format "{}{}", passage_instruction "B: " with format "{}{}".
    query_max_length = max_length * 3 // 4
    query_inputs = tokenizer(
        f"A: {query}",
        return_tensors=None,
        add_special_tokens=False,
        max_length=query_max_length,
        truncation=True,
    )["input_ids"]
    passage_inputs = tokenizer(
        f"B: {passage}",
        return_tensors=None,
        add_special_tokens=False,
        max_length=max_length,
        truncation=True,
    )["input_ids"]
    # if self.tokenizer.bos_token_id is not None and self.tokenizer.bos_token_id != self.tokenizer.pad_token_id:
    #     item = self.tokenizer.prepare_for_model([bos] + query_inputs['input_ids'], sep_inputs + passage_inputs['input_ids'],
    #                                             truncation='only_second', max_length=encode_max_length, ...,
    #                                             add_special_tokens=False)
    # else: the same without [bos]
    bos = tokenizer.bos_token_id
    if bos is not None and bos != tokenizer.pad_token_id:
        first = [bos] + list(query_inputs)
    else:
        first = list(query_inputs)
    second = list(sep_inputs) + list(passage_inputs)
    first, second = _truncate_only_second(
        first, second, encode_max_length, tokenizer.truncation_side
    )
    # item['input_ids'] = item['input_ids'] + sep_inputs + prompt_inputs
    return first + second + list(sep_inputs) + list(prompt_inputs)


def bge_gemma_reference(
    model_dir,
    query: str,
    documents: Sequence[str],
    prompt: str | None = None,
    max_length: int = 512,
) -> Result:
    """bge-reranker-v2-gemma: raw = logits[-1, id("Yes")] of the full causal-LM forward, with
    ``yes_loc = tokenizer('Yes', add_special_tokens=False)['input_ids'][0]``."""
    key = _key(model_dir)
    tokenizer = _tokenizer(key)
    model = _causal_lm(key)
    yes_loc = tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    out: Result = []
    with torch.inference_mode():
        for doc in documents:
            ids = bge_gemma_reference_ids(key, query, doc, prompt, max_length)
            logits = model(input_ids=torch.tensor([ids])).logits
            out.append((ids, logits[0, -1, yes_loc].item()))
    return out


# ---------------------------------------------------------------------------------------------
# Sequence-classification cross-encoders (XLM-R / BERT, one label)
# ---------------------------------------------------------------------------------------------


def cross_encoder_reference(
    model_dir, query: str, documents: Sequence[str], max_length: int = 512
) -> Result:
    """Cross-encoder: ``tokenizer(query, doc, truncation="only_second", max_length=max_length)``
    (the tokenizer's own pair encoding: XLM-R ``<s> q </s></s> d </s>``, BERT
    ``[CLS] q [SEP] d [SEP]`` with token_type_ids), then
    ``AutoModelForSequenceClassification(...).logits[0, 0]``.

    This equals FlagEmbedding's encoder-only reranker (:func:`flag_cross_encoder_reference`)
    while the query is at most 3/4·max_length tokens (FlagEmbedding cuts longer queries to that
    first). It equals sentence-transformers' ``CrossEncoder`` whenever nothing is truncated, or
    only the document is (CrossEncoder truncates "longest_first", which starts cutting the query
    only once the document has been cut down to the query's length).
    """
    key = _key(model_dir)
    tokenizer = _tokenizer(key)
    model = _seq_cls(key)
    out: Result = []
    with torch.inference_mode():
        for doc in documents:
            # A one-pair *batch*, as sentence-transformers' CrossEncoder calls the tokenizer:
            # ``tokenizer(query, "")`` would silently encode the query alone (transformers
            # checks ``if text_pair``), while a batch keeps an empty document as a pair.
            enc = tokenizer(
                [query], [doc], truncation="only_second", max_length=max_length, return_tensors="pt"
            )
            logits = model(**enc).logits
            out.append((enc["input_ids"][0].tolist(), logits[0, 0].item()))
    return out


def flag_cross_encoder_reference(
    model_dir,
    query: str,
    documents: Sequence[str],
    max_length: int = 512,
    query_max_length: int | None = None,
) -> Result:
    """FlagEmbedding's encoder-only ``BaseReranker.compute_score_single_gpu`` (bge-reranker-v2-m3):
    query ids cut to ``max_length * 3 // 4``, document ids cut to ``max_length`` (both without
    special tokens), then ``prepare_for_model(q, d, truncation='only_second',
    max_length=max_length)`` which adds the pair's special tokens. transformers 5 fast tokenizers
    have no ``prepare_for_model``, so the truncation is done on ``tokenizers.Encoding`` objects
    and the special tokens / token types come from the tokenizer's own post-processor.
    """
    key = _key(model_dir)
    tokenizer = _tokenizer(key)
    model = _seq_cls(key)
    backend = _plain_backend(key)
    if query_max_length is None:
        query_max_length = max_length * 3 // 4
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    out: Result = []
    with torch.inference_mode():
        for doc in documents:
            q = backend.encode(query, add_special_tokens=False)
            d = backend.encode(doc, add_special_tokens=False)
            q.truncate(query_max_length, direction=tokenizer.truncation_side)
            d.truncate(max_length, direction=tokenizer.truncation_side)
            excess = len(q.ids) + len(d.ids) + n_special - max_length
            if excess > 0:
                assert len(d.ids) > excess, "only_second truncation impossible"
                d.truncate(len(d.ids) - excess, direction=tokenizer.truncation_side)
            pair = backend.post_processor.process(q, d, add_special_tokens=True)
            input_ids = torch.tensor([pair.ids])
            inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
            if "token_type_ids" in tokenizer.model_input_names:
                inputs["token_type_ids"] = torch.tensor([pair.type_ids])
            logits = model(**inputs).logits
            out.append((list(pair.ids), logits[0, 0].item()))
    return out


# ---------------------------------------------------------------------------------------------
# mxbai-rerank-v2 (Qwen2ForCausalLM) — the PyPI package `mxbai-rerank`, run as is
# ---------------------------------------------------------------------------------------------


@functools.cache
def _mxbai(model_dir: str, max_length: int):
    """The package's own `MxbaiRerankV2` in float32 on CPU.

    transformers 5 dropped `prepare_for_model` / `truncate_sequences` from fast tokenizers,
    which the package (0.1.6) calls; they are bound back from transformers' own Python-backend
    tokenizer class (the upstream code, unchanged), so the package runs its own truncation.
    """
    import types

    from mxbai_rerank import MxbaiRerankV2
    from transformers.tokenization_python import PreTrainedTokenizer

    model = MxbaiRerankV2(model_dir, device="cpu", torch_dtype=torch.float32, max_length=max_length)
    for name in ("prepare_for_model", "truncate_sequences"):
        if not hasattr(type(model.tokenizer), name):
            method = types.MethodType(getattr(PreTrainedTokenizer, name), model.tokenizer)
            setattr(model.tokenizer, name, method)
    return model


def mxbai_reference(
    model_dir,
    query: str,
    documents: Sequence[str],
    instruction: str | None = None,
    max_length: int = 8192,
) -> Result:
    """mxbai-rerank-v2: ids from the package's `prepare_inputs`, raw from its
    `predict(normalize=False)` (logit("1") − logit("0")), one pair at a time."""
    model = _mxbai(_key(model_dir), max_length)
    out: Result = []
    for doc in documents:
        inputs = model.prepare_inputs([query], [doc], instruction=instruction)
        row, mask = inputs["input_ids"][0].tolist(), inputs["attention_mask"][0].tolist()
        ids = [t for t, keep in zip(row, mask, strict=True) if keep]
        raw = model.predict([query], [doc], instruction=instruction).item()
        out.append((ids, raw))
    return out


# ---------------------------------------------------------------------------------------------
# sentence-transformers causal-LM cross-encoders (LogitScore) — CrossEncoder.predict, as is
# ---------------------------------------------------------------------------------------------


@functools.cache
def _st_cross_encoder(model_dir: str, max_length: int | None):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(model_dir, device="cpu", max_length=max_length)


def st_causal_reference(
    model_dir,
    query: str,
    documents: Sequence[str],
    instruction: str | None = None,
    max_length: int | None = None,
) -> Result:
    """`CrossEncoder.predict` of sentence-transformers (>= 6.2), one pair at a time, float32,
    no activation; ids from its own `preprocess` with the same resolved prompt
    (`instruction` is its `prompt=`: None → the default prompt, "" → none)."""
    model = _st_cross_encoder(_key(model_dir), max_length)
    prompt = model._resolve_prompt(instruction, None)
    out: Result = []
    for doc in documents:
        features = model.preprocess([(query, doc)], prompt=prompt)
        row, mask = features["input_ids"][0].tolist(), features["attention_mask"][0].tolist()
        ids = [t for t, keep in zip(row, mask, strict=True) if keep]
        raw = model.predict(
            [(query, doc)], prompt=instruction, activation_fn=torch.nn.Identity(), batch_size=1
        )
        out.append((ids, float(raw[0])))
    return out
