"""A batch in a fixed shape (a bucket), for the replay of a captured CUDA graph.

A captured graph replays the same kernels, with the same launch sizes, on the same memory.
Every batch it serves must therefore look alike to the host: the same number of rows,
sequences and gathered keys, and the same maximum lengths (flash attention sizes its grid by
them). Here a batch becomes that shape:

- one stream of rows: the shared prefixes', then each document's own tokens, then padding
  rows up to the bucket's row count;
- one varlen attention call per layer over every row. Each prefix is a sequence of its own
  (causal over itself). Each document is a sequence whose keys are its prefix's rows and
  then its own (`gather` picks them from the stream). The padding rows form sequences of at
  most `PAD_SEQUENCE` rows, so every row is computed from finite values. Unused sequence
  slots are empty (`cu_seqlens` repeats its last offset);
- the score rows: each document's first row (an encoder's [CLS]) and last row (a decoder's
  score token), then row 0 for unused slots.

Where no prefix is shared (always for encoders, whose attention is bidirectional) each
sequence's keys are its own rows, where its queries are, and nothing is gathered
(`Bucket.keys` 0).

`Bucket` rounds every count up on a grid (`bucket_size`), so that a steady workload reuses a
few captured graphs. `StaticInputs` holds one bucket's device buffers, which the graph reads,
and `StaticInputs.fill` copies a batch into them: three page-locked, non-blocking copies,
in stream order after whatever replay came before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rerankd.ops.batch import PackedBatch, VarlenLayout, shared_prefixes
from rerankd.types import EncodedPair

#: padding rows form sequences of at most this many rows: short causal sequences (a long one
#: would cost attention work quadratic in the padding), one flash-attention block each
PAD_SEQUENCE = 128
#: grid steps per doubling of rows and keys: at most ~6 % padding (W-GPU's 41k rows: 2,048)
ROW_STEPS = 16
#: the same for sequences (prefixes, documents and padding sequences): powers of two, as an
#: empty sequence slot costs attention blocks that return at once, and fewer buckets mean
#: fewer captures (W-GPU's 109 sequences: 128)
SEQUENCE_STEPS = 1
#: smallest row and sequence buckets, and the smallest maximum length
MIN_ROWS = 64
MIN_SEQUENCES = 16
MIN_LENGTH = 128


def bucket_size(n: int, steps: int, minimum: int) -> int:
    """The smallest value >= `n` on the grid of `steps` values per doubling (multiples of
    2^floor(log2 n) / steps), and at least `minimum` (itself rounded to the grid)."""
    n = max(n, minimum)
    step = max(1, (1 << (n.bit_length() - 1)) // steps)
    return -(-n // step) * step


def length_bucket(n: int) -> int:
    """A maximum sequence length rounded up to a power of two (at least `MIN_LENGTH`): the
    kernel's grid over-covers by at most 2x, and its extra blocks return at once."""
    return max(MIN_LENGTH, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class Bucket:
    """The shapes a captured graph was made for. `keys` 0: no key gather (no shared
    prefixes, keys are the stream's rows); `types`: token type ids (BERT-style encoders)."""

    rows: int
    sequences: int
    keys: int
    max_q: int
    max_k: int
    types: bool = False


@dataclass
class RowLayout:
    """A batch as the rows of one stream, on the host (numpy), before bucketing."""

    ids: np.ndarray  # (rows,) int64, padding included
    positions: np.ndarray  # (rows,)
    types: np.ndarray | None  # (rows,) token type ids, where the pairs have them
    cu_q: list[int]  # (sequences + 1,) query offsets in the stream
    cu_k: list[int]  # (sequences + 1,) key offsets in `gather` (in the stream without it)
    gather: np.ndarray | None  # (keys,) stream row of each key, sequence by sequence
    first: list[int]  # the stream row of each document's first unshared token, pair order
    last: list[int]  # the stream row of each document's last token, in pair order
    bucket: Bucket

    @property
    def documents(self) -> int:
        return len(self.last)


def row_layout(
    pairs: Sequence[EncodedPair], groups: Sequence[int] | None, share_prefix: bool = True
) -> RowLayout:
    """`pairs` as one bucketed stream of rows (module docstring), shared prefixes as in
    `batch.pack`. Where no prefix is shared (always without `share_prefix`: encoders,
    whose attention is bidirectional) no key is gathered: each sequence's keys are its own
    rows, where its queries are."""
    prefix_len, prefix_of, prefix_ids = shared_prefixes(pairs, groups, share_prefix)
    prefix_starts = np.cumsum([0, *map(len, prefix_ids)]).tolist()
    typed = bool(pairs) and pairs[0].token_type_ids is not None
    ids = [np.asarray(p, dtype=np.int64) for p in prefix_ids]
    positions = [np.arange(len(p)) for p in prefix_ids]
    types = [np.zeros(len(p), dtype=np.int64) for p in prefix_ids]
    q_lengths = [len(p) for p in prefix_ids]
    k_lengths = list(q_lengths)  # a prefix attends to itself
    keys = [
        np.arange(start, start + len(p))
        for start, p in zip(prefix_starts[:-1], prefix_ids, strict=True)
    ]
    row, first, last = prefix_starts[-1], [], []
    for pair, skip, prefix in zip(pairs, prefix_len, prefix_of, strict=True):
        own = len(pair) - skip
        ids.append(np.asarray(pair.input_ids[skip:], dtype=np.int64))
        positions.append(np.arange(skip, len(pair)))
        if typed:
            types.append(np.asarray(pair.token_type_ids[skip:], dtype=np.int64))
        q_lengths.append(own)
        k_lengths.append(skip + own)  # its prefix's rows (skip is 0 without one), its own
        if prefix >= 0:
            keys.append(np.arange(prefix_starts[prefix], prefix_starts[prefix] + skip))
        keys.append(np.arange(row, row + own))
        first.append(row)
        row += own
        last.append(row - 1)
    rows = bucket_size(row, ROW_STEPS, MIN_ROWS)
    for start in range(row, rows, PAD_SEQUENCE):  # padding: short sequences of their own
        n = min(PAD_SEQUENCE, rows - start)
        ids.append(np.zeros(n, dtype=np.int64))
        positions.append(np.arange(n))
        types.append(np.zeros(n, dtype=np.int64))
        q_lengths.append(n)
        k_lengths.append(n)
        keys.append(np.arange(start, start + n))
    # no prefix formed (encoders never share one): each sequence's keys are its own rows,
    # where its queries are; gathering them would copy every key and value for nothing
    gather = np.concatenate(keys) if prefix_ids else None
    bucket = Bucket(
        rows=rows,
        sequences=bucket_size(len(q_lengths), SEQUENCE_STEPS, MIN_SEQUENCES),
        keys=0 if gather is None else bucket_size(len(gather), ROW_STEPS, MIN_ROWS),
        max_q=length_bucket(max(q_lengths)),
        max_k=length_bucket(max(k_lengths)),
        types=typed,
    )
    cu_q = np.cumsum([0, *q_lengths]).tolist()
    return RowLayout(
        ids=np.concatenate(ids),
        positions=np.concatenate(positions),
        types=np.concatenate(types) if typed else None,
        cu_q=cu_q,
        cu_k=cu_q if gather is None else np.cumsum([0, *k_lengths]).tolist(),
        gather=gather,
        first=first,
        last=last,
        bucket=bucket,
    )


def _padded(values: Sequence[int] | np.ndarray, size: int, fill: int) -> np.ndarray:
    out = np.full(size, fill, dtype=np.int64)
    out[: len(values)] = values
    return out


class StaticInputs:
    """One bucket's input buffers on the device, which a captured graph reads: token ids,
    positions, token types (where the bucket has them), key gather (where it has one) and
    the rows the score head reads (first and last token of each sequence slot), int64 in
    one allocation; query and key offsets (int32, each its own allocation, as
    `VarlenLayout.build` gives them to varlen kernels); and the batch view the model reads
    (`PackedBatch`: its attention, embeddings and score rows)."""

    def __init__(self, bucket: Bucket, device: torch.device) -> None:
        self.bucket = b = bucket
        sizes = [b.rows, b.rows, b.rows if b.types else 0, b.keys, b.sequences, b.sequences]
        self._long = torch.zeros(sum(sizes), dtype=torch.long, device=device)
        ids, positions, types, gather, first, last = self._long.split(sizes)
        cu_q, cu_k = (torch.zeros(b.sequences + 1, dtype=torch.int32, device=device) for _ in "qk")
        self._offsets = (cu_q, cu_k)
        varlen = VarlenLayout(cu_q, cu_k, b.max_q, b.max_k, gather, stream_keys=b.keys > 0)
        self.batch = PackedBatch(
            input_ids=ids,
            positions=positions,
            starts=[],
            lengths=[],
            last=last,
            prefix_of=[],
            prefixes=[],
            token_type_ids=types if b.types else None,
            varlen=varlen,
            first=first,
        )

    @property
    def last(self) -> torch.Tensor:
        """Each sequence slot's last row (a decoder's score row; unused slots: row 0)."""
        return self.batch.last

    @property
    def first(self) -> torch.Tensor:
        """Each sequence slot's first row (an encoder's [CLS]; unused slots: row 0)."""
        return self.batch.first

    def fill(self, layout: RowLayout) -> None:
        """Copy `layout` into the buffers (its bucket must be theirs): unused sequence slots
        repeat the last offset (empty sequences), unused keys and score rows read row 0."""
        if layout.bucket != self.bucket:
            raise ValueError(f"layout of {layout.bucket} into buffers of {self.bucket}")
        b = self.bucket
        parts = [layout.ids, layout.positions]
        parts += [layout.types] if b.types else []
        parts += [_padded(layout.gather, b.keys, 0)] if b.keys else []
        parts += [_padded(layout.first, b.sequences, 0), _padded(layout.last, b.sequences, 0)]
        _copy_in(self._long, np.concatenate(parts))
        for target, offsets in zip(self._offsets, (layout.cu_q, layout.cu_k), strict=True):
            _copy_in(target, _padded(offsets, b.sequences + 1, offsets[-1]).astype(np.int32))


def _copy_in(target: torch.Tensor, values: np.ndarray) -> None:
    """`target.copy_(values)`: on CUDA from page-locked memory without waiting (in stream
    order: after the replay queued before it, before the one queued after it)."""
    host = torch.from_numpy(values)
    if target.device.type == "cuda":
        target.copy_(host.pin_memory(), non_blocking=True)
    else:
        target.copy_(host)
