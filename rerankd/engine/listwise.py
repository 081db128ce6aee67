"""The listwise engine (jina-reranker-v3): window prompts → per-document cosine scores.

A listwise model scores a document only together with the other documents of its request,
so the unit of work is a *listing* (recipes/jina_v3.py): a request's window prompts, with the
positions of each document's and the query's special token. Its pairs (one per document)
point to the listing; the first batch that holds one of them computes the whole listing and
keeps every document's score until the listing is gone (a weak reference), so pairs of one
request that the scheduler spreads over several batches are computed once.

Per window: our Qwen3 decoder on the packed window prompts (no padding; several windows per
stream up to the token budget; split in two on out-of-memory), the final hidden state at the
special tokens projected (models/jina_v3.py), then Jina's `rerank` over the windows:

    s_w = cos(D_w, q_w)                     (n_w,)  each document against its window's query
    a_w = max((1 + s_w) / 2)                        the window's weight
    q   = Σ_w a_w q_w / Σ_w a_w             (dim,)  the merged query embedding
    score_i = cos(d_i, q)                           for every document i of the listing

with one window, score_i = cos(d_i, q_w).

How a long request runs. The recipe forms the windows as the hub `rerank` does (a window
closes at 125 documents or once its documents leave ≤ 2048 of model_max_length − 2·query
tokens; recipes/jina_v3.py), so a window is at most ~model_max_length tokens (131072 on the
hub; `--max-model-len` lowers it). Each window is one sequence computed in one forward (causal
SDPA, memory linear in its length): it is never split, since every token attends to the whole
prefix — vLLM's `JinaForRanking` computes the same prompt, but may spread a long one over
several steps with chunked prefill and its KV cache, which rerankd's engines do not have.
The windows of a listing are packed into forwards of up to `--max-batch-tokens` tokens (a
longer window goes alone), one after another. They are all computed within the engine call
of the first batch that holds one of the listing's pairs: every document's score depends on
every window (the merged query q above), so no score is ready before the last window; the
other pairs of the listing then cost nothing. A request of many windows therefore holds the
engine for all of them at once (the scheduler's token budget counts them, as each pair
carries its share of its window's tokens). The engine knows nothing of text: the listing
carries token ids and positions (read by attribute: engine/ imports no recipe).

What it lacks of the packed engine: shared prefixes (each window is its own prompt), the AMX
and varlen attention kernels (SDPA per window) and int8; it has its prepacked bf16 linears on
CPU and, with `--compile auto` where its measured row says so (compile_policy's
`LISTWISE_MEASURED`: AMX and Zen 4 in bf16 and float32, AVX512-VNNI in float32) or `on`, the
decoder's compiled per-token work, kept only if a probe window's scores agree with eager ones. Eager, the norms, RoPE and
activations were 70 % of a window's time (one 3k-token window of 14 layers: 36-76 s eager,
9.3 s compiled, on the shared machine; docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import random
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from rerankd.engine.base import default_batch_tokens, split_on_oom
from rerankd.engine.compile_policy import LISTWISE, scores_disagree, wants_compile
from rerankd.engine.packed_engine import COMPILE_MODES, check_mode
from rerankd.models.jina_v3 import load_jina_v3
from rerankd.models.kernels import Kernels
from rerankd.models.weights import open_checkpoint
from rerankd.ops.batch import pack
from rerankd.ops.prepack import ONEDNN_ROW_MULTIPLE, prepack_linears
from rerankd.types import Batch, EncodedPair

log = logging.getLogger(__name__)

#: guards the cosine's denominator (torch.nn.functional.cosine_similarity's eps)
_EPS = 1e-8
#: compiled and eager per-token work may differ by bf16 roundings: the most a probe
#: window's cosine scores may move for the compiled path to be kept
_COMPILE_TOLERANCE = 2e-2


class _Window(Protocol):
    input_ids: tuple[int, ...]
    document_positions: tuple[int, ...]
    query_position: int


class ListwiseEngine:
    """Scores listwise pairs (`pair.listing`, `pair.document`) by cosine over windows."""

    def __init__(
        self,
        model_dir: Path,
        hf_config: Any,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int | None = None,
        compile: str = "auto",
    ) -> None:
        check_mode("compile", compile, COMPILE_MODES)
        with open_checkpoint(Path(model_dir)) as checkpoint:
            self.model = load_jina_v3(checkpoint, hf_config, dtype, device)
        # the decoder's default kernels: SDPA, eager per-token work
        # bf16 on CPU: oneDNN-prepacked linears (exactly F.linear's output, checked by a probe),
        # the token stream padded to recurring row counts, as the packed engine does
        if prepack_linears(self.model.decoder, device, dtype) > 0:
            self.model.decoder.set_row_multiple(ONEDNN_ROW_MULTIPLE)
        self.name = "listwise"
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self._device = device
        self.default_batch_tokens = default_batch_tokens(device)
        self.max_batch_tokens = max_batch_tokens or self.default_batch_tokens
        #: listing → its documents' scores, while the listing lives
        self._scores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # `auto`: this engine's own measured row (compile_policy.LISTWISE_MEASURED)
        self.compiled = wants_compile(
            compile, LISTWISE, dtype, False, device
        ) and self._compile_agrees(hf_config.vocab_size)

    def score(self, batch: Batch) -> list[float]:
        """Each pair's document score in its listing, in batch order."""
        listings = []
        for pair in batch.pairs:
            listing = getattr(pair, "listing", None)
            if listing is None:
                raise TypeError("the listwise engine scores listwise pairs only; this is a bug")
            if listing not in self._scores and listing not in listings:
                listings.append(listing)
        if listings:
            windows = [w for listing in listings for w in listing.windows]
            embedded = iter(self.embed(windows))
            for listing in listings:
                parts = [next(embedded) for _ in listing.windows]
                self._scores[listing] = merge_windows(parts).tolist()
        return [self._scores[pair.listing][pair.document] for pair in batch.pairs]

    def embed(self, windows: Sequence[_Window]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(query (dim,), documents (n, dim)) projected embeddings of each window, float32."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for chunk in _chunks([len(w.input_ids) for w in windows], self.max_batch_tokens):
            part = [windows[i] for i in chunk]
            out += split_on_oom(self.forward, part, None, self._device, unit="windows")
        return out

    @torch.inference_mode()
    def forward(
        self, windows: Sequence[_Window], groups: list[int] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One packed stream of windows: the seam `split_on_oom` and engine/faults.py wrap."""
        packed = pack([EncodedPair(w.input_ids) for w in windows], None, self._device, False)
        rows = []
        for start, window in zip(packed.starts, windows, strict=True):
            rows += [start + p for p in (*window.document_positions, window.query_position)]
        embedded = self.model(packed, torch.tensor(rows, device=self._device)).cpu()
        out, at = [], 0
        for window in windows:
            n = len(window.document_positions)
            out.append((embedded[at + n], embedded[at : at + n]))
            at += n + 1
        return out

    def _compile_agrees(self, vocab_size: int) -> bool:
        """Compile the decoder's per-token work (the warm-up, before the server is ready) and
        keep it only if two probe windows score as eager, all finite (`scores_disagree`);
        any compiler failure stays eager."""
        probes = [_probe(vocab_size, length, seed) for seed, length in enumerate((48, 37))]
        try:
            expected = [merge_windows(self.forward([w])) for w in probes]
            self.model.decoder.set_kernels(Kernels("sdpa", compiled=True))
            got = [merge_windows(self.forward([w])) for w in probes]
        except Exception as exc:
            self.model.decoder.set_kernels(Kernels("sdpa"))
            log.warning("torch.compile unavailable (%s); the listwise engine runs eager", exc)
            return False
        worst = scores_disagree(torch.cat(expected), torch.cat(got))
        if worst > _COMPILE_TOLERANCE:
            self.model.decoder.set_kernels(Kernels("sdpa"))
            log.warning("compiled per-token work moves scores by %.3g; running eager", worst)
            return False
        return True


@dataclass(frozen=True)
class _ProbeWindow:
    input_ids: tuple[int, ...]
    document_positions: tuple[int, ...]
    query_position: int


def _probe(vocab_size: int, length: int, seed: int) -> _ProbeWindow:
    """A window of random tokens with three documents and the query at the end."""
    rng = random.Random(seed)
    ids = tuple(rng.randrange(vocab_size) for _ in range(length))
    return _ProbeWindow(ids, (length // 4, length // 2, 3 * length // 4), length - 2)


def merge_windows(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Documents' scores (N,) over all windows (query (dim,), documents (n_w, dim)) as Jina's
    `rerank` merges them (see the module docstring)."""
    queries = torch.stack([q for q, _ in parts])  # (W, dim)
    documents = torch.cat([d for _, d in parts])  # (N, dim)
    weights = torch.stack([((1 + _cosine(d, q)) / 2).max() for q, d in parts])  # (W,)
    total = weights.sum()
    if total <= 0:  # every document exactly opposite its query: no window outweighs another
        weights, total = torch.ones_like(weights), torch.tensor(float(len(parts)))
    query = (weights[:, None] * queries).sum(0) / total  # (dim,)
    return _cosine(documents, query)


def _cosine(documents: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """cos(d_i, q) for each row d_i: (n, dim), (dim,) -> (n,)."""
    norms = documents.norm(dim=-1) * query.norm()
    return (documents @ query) / norms.clamp_min(_EPS)


def _chunks(lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Consecutive windows (by index) whose tokens fit `budget`; a longer one goes alone."""
    chunk: list[int] = []
    tokens = 0
    for index, length in enumerate(lengths):
        if chunk and tokens + length > budget:
            yield chunk
            chunk, tokens = [], 0
        chunk.append(index)
        tokens += length
    if chunk:
        yield chunk
