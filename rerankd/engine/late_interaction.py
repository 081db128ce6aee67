"""The late-interaction engine: ColBERT pairs (`EncodedTwin`) → MaxSim scores.

A batch's distinct sequences are encoded once each: every query (a rerank request's one
query once, however many documents it has) and every document not already in the embedding
cache. Documents go through the backbone in packed batches (no padding computed) on our
BERT/XLM-R encoder; other backbones (ModernBERT …) run through transformers' AutoModel,
padded. Token embeddings are projected, L2-normalized in float32; a document keeps the rows
of tokens outside the skiplist, a query all of its rows. Each query's MaxSim against its
documents is one matmul over the documents' concatenated rows plus a segment max:

    S = Q Dᵀ            (Lq, dim) x (dim, ΣLd) -> (Lq, ΣLd)
    M = segment_max(S)  (Lq, n)   per document, its best token for each query token
    score = M.sum(0)    (n,)

The engine knows nothing of text: which rows a query attends to (`query_keys`, when its
expansion tokens are hidden) comes with the pair, the skiplist's token ids with the recipe.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rerankd.engine.base import default_batch_tokens, padded_chunks, split_on_oom
from rerankd.errors import ModelLoadError
from rerankd.models.colbert import load_colbert_encoder, load_projections, project
from rerankd.models.encoder import EncoderConfig
from rerankd.models.kernels import Kernels
from rerankd.models.loader import UnsupportedCheckpoint
from rerankd.models.weights import open_checkpoint
from rerankd.ops.attention import cuda_backends
from rerankd.ops.batch import pack
from rerankd.ops.prepack import prepack_linears
from rerankd.types import Batch, EncodedPair, EncodedTwin

log = logging.getLogger(__name__)

#: document token embeddings kept across batches (rows; 64 MiB at dim 128 in float32)
DEFAULT_CACHE_ROWS = 131_072


class LateInteractionEngine:
    """Scores ColBERT pairs by MaxSim, with a bounded cache of document embeddings."""

    def __init__(
        self,
        model_dir: Path,
        config: Any,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int | None = None,
        *,
        dense_dirs: Sequence[Path] = (),
        skiplist_ids: Sequence[int] = (),
        cache_rows: int = DEFAULT_CACHE_ROWS,
        backbone: str = "auto",
    ) -> None:
        self.name = "late-interaction"
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self._device = device
        self._skiplist = torch.tensor(sorted(skiplist_ids), dtype=torch.long)
        self.cache = EmbeddingCache(cache_rows)
        self._backbone = None
        if backbone in ("auto", "packed"):
            try:
                self._backbone = _PackedBackbone(model_dir, config, list(dense_dirs), device, dtype)
            except UnsupportedCheckpoint as exc:
                if backbone == "packed":
                    raise
                log.info("packed ColBERT backbone unavailable (%s); using transformers", exc)
        if self._backbone is None:
            self._backbone = _TransformersBackbone(model_dir, list(dense_dirs), device, dtype)
        self.backbone = self._backbone.name
        padded = self._backbone.name == "transformers"
        self.default_batch_tokens = default_batch_tokens(device, padded=padded)
        self.max_batch_tokens = max_batch_tokens or self.default_batch_tokens

    # --- scoring ---------------------------------------------------------------------------

    def score(self, batch: Batch) -> list[float]:
        """MaxSim of (query, document) for each pair, in batch order."""
        queries: dict[tuple[int, ...], int] = {}  # query ids → its attended length
        order: dict[tuple[int, ...], list[int]] = {}  # query ids → its pairs
        for index, pair in enumerate(batch.pairs):
            if not isinstance(pair, EncodedTwin):
                raise TypeError("the late-interaction engine scores ColBERT pairs only")
            keys = getattr(pair, "query_keys", 0) or len(pair.query_ids)
            queries[pair.query_ids] = keys
            order.setdefault(pair.query_ids, []).append(index)
        if not queries:
            return []
        documents = self.document_embeddings(
            list(dict.fromkeys(p.document_ids for p in batch.pairs))
        )
        query_rows = self.embed(list(queries), list(queries.values()))
        scores = [0.0] * len(batch.pairs)
        for q, indices in zip(query_rows, order.values(), strict=True):
            docs = [documents[batch.pairs[i].document_ids] for i in indices]
            for i, value in zip(indices, maxsim(q, docs).tolist(), strict=True):
                scores[i] = value
        return scores

    def document_embeddings(self, sequences: list[tuple[int, ...]]) -> dict:
        """Normalized, skiplist-filtered token embeddings of each document (cached)."""
        out = {s: self.cache.get(s) for s in sequences}
        missing = [s for s, rows in out.items() if rows is None]
        if missing:
            for sequence, rows in zip(
                missing, self.embed(missing, [len(s) for s in missing]), strict=True
            ):
                ids = torch.tensor(sequence, dtype=torch.long)
                keep = ~torch.isin(ids, self._skiplist)
                rows = rows[keep.to(rows.device)]
                self.cache.put(sequence, rows)
                out[sequence] = rows
        return out

    def embed(self, sequences: list[tuple[int, ...]], keys: list[int]) -> list[torch.Tensor]:
        """Unit-length float32 token embeddings (len, dim) of each sequence, every row."""
        rows: list[torch.Tensor | None] = [None] * len(sequences)
        limited = any(k < len(s) for s, k in zip(sequences, keys, strict=True))
        items = list(zip(sequences, keys, strict=True))
        for chunk in self._backbone.chunks([len(s) for s in sequences], self.max_batch_tokens):
            embedded = split_on_oom(
                lambda part, _: self._backbone.forward(part, limited),
                [items[i] for i in chunk],
                None,
                self._device,
                _cat,
                "sequences",
            )
            for i, row in zip(chunk, embedded, strict=True):
                rows[i] = F.normalize(row.float(), p=2, dim=-1)
        return rows


def maxsim(query: torch.Tensor, documents: list[torch.Tensor]) -> torch.Tensor:
    """Σ over query rows of the max over each document's rows of their dot products.

    query: (Lq, dim); documents: n tensors (Ld_i, dim) → (n,), as one matmul and a segment
    max. A document without rows scores 0 (PyLate's zero padding would give the same)."""
    lengths = torch.tensor([len(d) for d in documents], device=query.device)
    flat = torch.cat(documents)  # (ΣLd, dim)
    sims = query @ flat.T  # (Lq, dim) x (dim, ΣLd) -> (Lq, ΣLd)
    segment = torch.repeat_interleave(torch.arange(len(documents), device=query.device), lengths)
    best = torch.full((len(query), len(documents)), float("-inf"), device=query.device)
    best = best.scatter_reduce(1, segment.expand(len(query), -1), sims, "amax")  # (Lq, n)
    return best.masked_fill(lengths == 0, 0.0).sum(dim=0)


class EmbeddingCache:
    """LRU cache of document embeddings keyed by the document's token ids (its content),
    bounded by the rows it holds. `hits`/`misses` count lookups."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.rows = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[int, ...]) -> torch.Tensor | None:
        rows = self._entries.get(key)
        if rows is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return rows

    def put(self, key: tuple[int, ...], rows: torch.Tensor) -> None:
        if len(rows) > self.max_rows or key in self._entries:
            return
        self._entries[key] = rows
        self.rows += len(rows)
        while self.rows > self.max_rows:
            _, evicted = self._entries.popitem(last=False)
            self.rows -= len(evicted)

    def clear(self) -> None:
        self._entries.clear()
        self.rows = 0


# --- backbones ------------------------------------------------------------------------------


class _PackedBackbone:
    """Our BERT/XLM-R encoder on packed batches (no padding computed)."""

    name = "packed"

    def __init__(self, model_dir, config, dense_dirs, device, dtype) -> None:
        encoder_config = EncoderConfig.from_hf_config(config)
        with open_checkpoint(Path(model_dir)) as checkpoint:
            try:
                self.model = load_colbert_encoder(
                    checkpoint, encoder_config, dense_dirs, dtype, device
                )
            except KeyError as exc:
                raise UnsupportedCheckpoint(f"unexpected checkpoint layout ({exc})") from exc
        # bf16 on CPU: oneDNN-prepacked linears with bias, GELU and residual in the epilogue
        # (exactly F.linear's output for the bias, checked by a probe; a no-op elsewhere)
        prepack_linears(self.model, device, dtype)
        self.device = device
        self.attention = "sdpa"
        if device.type == "cuda":  # the first fused kernel that agrees with SDPA
            self.attention = next(filter(self._agrees, cuda_backends()), "sdpa")
        self.model.set_kernels(Kernels(self.attention))

    def _agrees(self, backend: str) -> bool:
        """Token embeddings of a probe batch through `backend` and through SDPA agree
        (cosine distance below 1e-2 per token, bf16's error)."""
        items = [(tuple(range(5, 5 + n)), n) for n in (7, 19, 3)]
        try:
            self.model.set_kernels(Kernels("sdpa"))
            expected = F.normalize(torch.cat(self.forward(items, False)).float(), dim=-1)
            self.model.set_kernels(Kernels(backend))
            got = F.normalize(torch.cat(self.forward(items, False)).float(), dim=-1)
        except Exception as exc:  # kernel missing, unsupported dtype/head size, ...
            log.warning("%s attention unavailable for ColBERT (%s)", backend, exc)
            return False
        worst = float((1 - (expected * got).sum(dim=-1)).abs().max())
        if worst > 1e-2:
            log.warning("%s attention disagrees with SDPA (%.3g); not using it", backend, worst)
        return worst <= 1e-2

    @staticmethod
    def chunks(lengths: list[int], budget: int):
        """Consecutive runs of sequences whose total tokens fit `budget` (at least one)."""
        chunk: list[int] = []
        total = 0
        for i, n in enumerate(lengths):
            if chunk and total + n > budget:
                yield chunk
                chunk, total = [], 0
            chunk.append(i)
            total += n
        if chunk:
            yield chunk

    @torch.inference_mode()
    def forward(self, items: list[tuple[tuple[int, ...], int]], limited: bool) -> list:
        batch = pack([EncodedPair(ids) for ids, _ in items], None, self.device, share_prefix=False)
        keys = [k for _, k in items] if limited else None
        out = self.model(batch, keys)  # (T, dim)
        return list(out.split(batch.lengths))


class _TransformersBackbone:
    """Any encoder transformers' AutoModel loads (ModernBERT …), padded, length-sorted."""

    name = "transformers"

    def __init__(self, model_dir, dense_dirs, device, dtype) -> None:
        from transformers import AutoModel

        model, loading = AutoModel.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
        # a backbone whose weights transformers' own class does not hold (remote code, e.g.
        # jina-colbert-v2's rotary XLM-R) would run with random tensors: refuse it
        missing = [k for k in loading["missing_keys"] if not k.startswith("pooler.")]
        if missing:
            raise ModelLoadError(
                f"transformers' {type(model).__name__} lacks {len(missing)} of this checkpoint's "
                f"tensors (e.g. {missing[0]!r}); its backbone needs its own code "
                "(trust_remote_code), which rerankd never runs"
            )
        self.model = model.to(device).eval()
        if dense_dirs:
            self.projections = load_projections(dense_dirs, None, dtype, device)
        else:
            with open_checkpoint(Path(model_dir)) as checkpoint:
                self.projections = load_projections([], checkpoint, dtype, device)
        self.pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        self.device = device

    @staticmethod
    def chunks(lengths: list[int], budget: int):
        return padded_chunks(lengths, budget)

    @torch.inference_mode()
    def forward(self, items: list[tuple[tuple[int, ...], int]], limited: bool) -> list:
        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (sequence, keys) in enumerate(items):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, :keys] = 1
        hidden = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state  # (B, W, hidden)
        hidden = project(hidden, self.projections)  # (B, W, dim)
        return [hidden[row, : len(sequence)] for row, (sequence, _) in enumerate(items)]


def _cat(first: list, second: list) -> list:
    return first + second
