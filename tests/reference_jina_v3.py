"""An independent jina-reranker-v3 reference on transformers, for the parity tests.

It follows Jina's `modeling.py` on the hub (jinaai/jina-reranker-v3, the file its `auto_map`
names, at its "max_query/doc_length parametrization" revision, 10.4 kB; vLLM's
`vllm/model_executor/models/jina.py` is adapted from it) step by step, written here so that no
checkpoint code runs: `JinaForRanking` is transformers' `Qwen3ForCausalLM` with the projector
Linear(hidden, hidden/2) → ReLU → Linear(hidden/2, 512), no biases; its forward reads
`hidden_states[-1]` at the tokens equal to the document and query token ids and returns the
documents' cosines with the query; `rerank` truncates the query (512 tokens) and the documents
(2048) by tokenizing and decoding, walks the documents into blocks (125 of them, or until the
capacity `model_max_length - 2·query_length` falls to 2048 or below), runs one prompt per
block, averages the blocks' query embeddings weighted by each block's best (1 + score)/2, and
scores every document by its cosine with that average (numpy, float32).

Three differences, none in what the scores depend on: the special tokens' ids are looked
up in the tokenizer (the hub code hard-codes 151670 and 151671, ids of the real vocabulary;
the tiny fixture's differ); the tokenizer is loaded without `trust_remote_code` (it is
transformers' own Qwen2 tokenizer class); and the LM head stays transformers' tied Linear
instead of `nn.Identity()` (transformers 5 ties weights into it on load and fails on an
Identity; the logits are never read). `rerank` also passes an `instruction` through to the
prompt function, which takes one (the hub's `rerank` always passes None).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer, Qwen3ForCausalLM

SPECIAL_TOKENS = {"query_embed_token": "<|rerank_token|>", "doc_embed_token": "<|embed_token|>"}


def sanitize_input(text: str, special_tokens: dict[str, str]) -> str:
    for token in special_tokens.values():
        text = text.replace(token, "")
    return text


def format_docs_prompts_func(query, docs, instruction=None, special_tokens=SPECIAL_TOKENS):
    """modeling.py's prompt, `no_thinking=True`."""
    query = sanitize_input(query, special_tokens)
    docs = [sanitize_input(doc, special_tokens) for doc in docs]
    prefix = (
        "<|im_start|>system\n"
        "You are a search relevance expert who can determine a ranking of the passages based "
        "on how relevant they are to the query. If the query is a question, how relevant a "
        "passage is depends on how well it answers the question. If not, try to analyze the "
        "intent of the query and assess how well each passage satisfies the intent. If an "
        "instruction is provided, you should follow the instruction when determining the "
        "ranking.<|im_end|>\n<|im_start|>user\n"
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n" + "<think>\n\n</think>\n\n"
    doc_token, query_token = special_tokens["doc_embed_token"], special_tokens["query_embed_token"]
    prompt = (
        f"I will provide you with {len(docs)} passages, each indicated by a numerical "
        f"identifier. Rank the passages based on their relevance to query: {query}\n"
    )
    if instruction:
        prompt += f"<instruct>\n{instruction}\n</instruct>\n"
    passages = [f'<passage id="{i}">\n{doc}{doc_token}\n</passage>' for i, doc in enumerate(docs)]
    prompt += "\n".join(passages) + "\n"
    prompt += f"<query>\n{query}{query_token}\n</query>"
    return prefix + prompt + suffix


class JinaForRanking(Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.projector_dim = 512
        self.projector = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size // 2, bias=False),
            nn.ReLU(),
            nn.Linear(config.hidden_size // 2, self.projector_dim, bias=False),
        )
        self.post_init()

    def rank_forward(self, input_ids, attention_mask):
        """modeling.py's `forward`: (scores, query embeddings, document embeddings)."""
        outputs = Qwen3ForCausalLM.forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=True,
        )
        hidden_states = outputs.hidden_states[-1]
        batch_size, _, dim = hidden_states.shape
        query_embed_token_indexes = torch.eq(input_ids, self.query_embed_token_id)
        doc_embed_token_indexes = torch.eq(input_ids, self.doc_embed_token_id)
        doc_embeds = hidden_states[doc_embed_token_indexes].view(batch_size, -1, dim)
        query_embeds = hidden_states[query_embed_token_indexes].unsqueeze(1)
        doc_embeds = self.projector(doc_embeds)
        query_embeds = self.projector(query_embeds)
        query_embeds_expanded = query_embeds.expand_as(doc_embeds)
        scores = torch.nn.functional.cosine_similarity(
            doc_embeds, query_embeds_expanded, dim=-1
        ).squeeze(-1)
        return scores, query_embeds, doc_embeds


class Reference:
    """The reference model and tokenizer of a checkpoint directory."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token
        self.tokenizer.padding_side = "left"
        self.model = JinaForRanking.from_pretrained(path, dtype=dtype).eval()
        ids = self.tokenizer.convert_tokens_to_ids
        self.model.doc_embed_token_id = ids(SPECIAL_TOKENS["doc_embed_token"])
        self.model.query_embed_token_id = ids(SPECIAL_TOKENS["query_embed_token"])
        #: token ids of every block prompt the last `rerank` ran
        self.prompts: list[list[int]] = []

    def _truncate_texts(self, query, documents, max_query_length=512, max_doc_length=2048):
        docs, doc_lengths = [], []
        for doc in documents:
            doc_tokens = self.tokenizer(doc, truncation=True, max_length=max_doc_length)
            if len(doc_tokens["input_ids"]) >= max_doc_length:
                doc = self.tokenizer.decode(doc_tokens["input_ids"])
            doc_lengths.append(len(doc_tokens["input_ids"]))
            docs.append(doc)
        query_tokens = self.tokenizer(query, truncation=True, max_length=max_query_length)
        if len(query_tokens["input_ids"]) >= max_query_length:
            query = self.tokenizer.decode(query_tokens["input_ids"])
        return query, docs, doc_lengths, len(query_tokens["input_ids"])

    def _compute_single_batch(self, query, docs, instruction=None):
        prompt = format_docs_prompts_func(query, docs, instruction=instruction)
        batch = self.tokenizer(
            text=[prompt], padding=True, padding_side="left", return_tensors="pt"
        )
        self.prompts.append(batch["input_ids"][0].tolist())
        return self.model.rank_forward(batch["input_ids"], batch["attention_mask"])

    @torch.no_grad()
    def rerank(self, query: str, documents: list[str], instruction: str | None = None):
        """Every document's `relevance_score`, in input order (modeling.py's `rerank`, with
        the `instruction` its prompt function takes passed through)."""
        self.prompts = []
        max_length = self.tokenizer.model_max_length
        max_query_length, max_doc_length, block_size = 512, 2048, 125
        query, docs, doc_lengths, query_length = self._truncate_texts(
            query, documents, max_query_length, max_doc_length
        )
        length_capacity = max_length - 2 * query_length
        block_docs, doc_embeddings, query_embeddings, block_weights = [], [], [], []

        def run(block):
            scores, queries, docs_ = self._compute_single_batch(query, block, instruction)
            doc_embeddings.extend(docs_[0].cpu().float().numpy())
            query_embeddings.append(queries[0].cpu().float().numpy())
            block_weights.append(((1.0 + scores.view(-1).cpu().float().numpy()) / 2.0).max())

        for length, doc in zip(doc_lengths, docs, strict=True):
            block_docs.append(doc)
            length_capacity -= length
            if len(block_docs) >= block_size or length_capacity <= max_doc_length:
                run(block_docs)
                block_docs = []
                length_capacity = max_length - 2 * query_length
        if block_docs:
            run(block_docs)
        query_embedding = np.average(np.array(query_embeddings), axis=0, weights=block_weights)
        doc_embeddings = np.array(doc_embeddings)
        scores = np.dot(query_embedding, doc_embeddings.T) / (
            np.linalg.norm(query_embedding) * np.linalg.norm(doc_embeddings, axis=1)
        )
        return [float(s) for s in scores[0]]
