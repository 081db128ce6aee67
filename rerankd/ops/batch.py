"""The packed batch: one flat token stream, per-sequence positions, shared prefixes.

No padding is ever computed. Pairs of the same request usually start with the same tokens
(template + instruction + query); the longest common *token* prefix of each group of pairs
is split off, run once, and every sequence of the group attends to its keys/values.

Host to device: every integer tensor of a batch is built in one host buffer and sent in one
copy (`upload`); on CUDA that buffer is page-locked and the copy non-blocking (`pin`, on by
default; `pin=False` copies from pageable memory, which waits for the stream: a host sync),
so the engine thread goes on (packing the next batch) while the copy and the kernels queued
after it run. On CPU `pin` changes nothing: the tensors are the same values either way.
Attention kernels that build more per-batch metadata (bucket layouts, document ids) send it
through `upload` too: no forward copies host data to the device any other way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rerankd.types import EncodedPair

#: prefixes shorter than this are not worth a separate pass
MIN_SHARED_PREFIX = 8


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token id sequences."""
    first = sequences[0]
    limit = min(len(s) for s in sequences)
    for other in sequences[1:]:
        n = 0
        while n < limit and other[n] == first[n]:
            n += 1
        limit = n
        if limit == 0:
            break
    return limit


@dataclass
class PackedBatch:
    """Token ids and layout of a batch, on the engine's device.

    - ``input_ids``/``positions``: (T,) for the unshared part of every sequence, concatenated
    - ``starts``/``lengths``: where each sequence's unshared tokens lie in the flat stream
    - ``last``: (N,) flat index of each sequence's last token (where the score is read)
    - ``first``/``counts``: (N,) flat index of each sequence's first unshared token (an
      encoder's [CLS]) and its number of unshared tokens, on the device (None when the batch
      was not made by `pack`): uploaded with the ids so that reading them costs no host sync
    - ``prefix_of``: for each sequence, the index of its shared prefix in ``prefixes`` or -1
    - ``prefixes``: (P_k,) token ids of each shared prefix (positions 0..P_k-1)
    - ``token_type_ids``: (T,) for encoders with segment embeddings, else None

    Shared prefixes are themselves run as one packed stream: prefix k occupies rows
    ``prefix_starts[k]:+len(prefixes[k])`` of the flat prefix keys/values.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    starts: list[int]
    lengths: list[int]
    last: torch.Tensor
    prefix_of: list[int]
    prefixes: list[torch.Tensor]
    token_type_ids: torch.Tensor | None = None
    varlen: VarlenLayout | None = None
    first: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def prefix_lengths(self) -> list[int]:
        return [len(p) for p in self.prefixes]

    @property
    def prefix_starts(self) -> list[int]:
        return _offsets(self.prefix_lengths)

    def prefix_span(self, sequence: int) -> tuple[int, int] | None:
        """(start, length) of this sequence's prefix in the flat prefix stream, or None."""
        index = self.prefix_of[sequence]
        if index < 0:
            return None
        return self.prefix_starts[index], len(self.prefixes[index])

    def with_varlen_layout(self, pin: bool = True) -> PackedBatch:
        """Attach the cu_seqlens/gather layout that varlen attention kernels need (`pin`: as
        `pack`'s)."""
        self.varlen = VarlenLayout.build(self, pin)
        return self


@dataclass
class VarlenLayout:
    """Inputs of a varlen attention kernel for this batch.

    Keys of sequence i are [its prefix's keys, its own keys]: ``gather`` picks them, in
    that order, from ``cat(flat prefix keys, flat own keys)``. Causal masking is aligned
    bottom-right (the last query sees every key), as flash-attention does when q < k.
    """

    cu_seq_q: torch.Tensor  # (N+1,) int32
    cu_seq_k: torch.Tensor  # (N+1,) int32
    max_q: int
    max_k: int
    gather: torch.Tensor  # (T_k,) long
    #: keys are the stream's own rows picked by `gather`, with no separate prefix keys (a
    #: captured CUDA graph's layout, ops/static_batch.py: prefixes and documents in one call)
    stream_keys: bool = False

    @classmethod
    def build(cls, batch: PackedBatch, pin: bool = True) -> VarlenLayout:
        device = batch.input_ids.device
        shared_total = sum(batch.prefix_lengths)
        prefix_starts, prefix_lengths = batch.prefix_starts, batch.prefix_lengths
        spans: list[range] = []  # key rows of each sequence: its prefix's, then its own
        k_lengths = []
        for start, length, prefix in zip(batch.starts, batch.lengths, batch.prefix_of, strict=True):
            shared = prefix_lengths[prefix] if prefix >= 0 else 0
            if shared:
                spans.append(range(prefix_starts[prefix], prefix_starts[prefix] + shared))
            spans.append(range(shared_total + start, shared_total + start + length))
            k_lengths.append(length + shared)
        index = [np.arange(r.start, r.stop) for r in spans]
        index = np.concatenate(index) if index else np.empty(0, dtype=np.int64)
        # each its own allocation: varlen kernels get cu_seqlens at an allocation's start
        (cu_seq_q,) = upload([_offsets(batch.lengths, total=True)], device, pin, torch.int32)
        (cu_seq_k,) = upload([_offsets(k_lengths, total=True)], device, pin, torch.int32)
        (gather,) = upload([index], device, pin)
        return cls(
            cu_seq_q=cu_seq_q,
            cu_seq_k=cu_seq_k,
            max_q=max(batch.lengths),
            max_k=max(k_lengths),
            gather=gather,
        )


def _offsets(lengths: Sequence[int], total: bool = False) -> list[int]:
    """Start offsets of consecutive spans (with the end appended when `total`)."""
    out, position = [], 0
    for n in lengths:
        out.append(position)
        position += n
    return [*out, position] if total else out


_NUMPY = {torch.long: np.int64, torch.int32: np.int32}


def upload(
    parts: Sequence[Sequence[int]],
    device: torch.device,
    pin: bool = True,
    dtype: torch.dtype = torch.long,
) -> list[torch.Tensor]:
    """`parts` as 1-D tensors on `device`, from one host buffer in one copy: views of one
    device tensor, in order. The one way host integers reach the device in a forward: a plain
    `torch.tensor(..., device=cuda)` copies from pageable memory and waits for the stream. `pin` on CUDA: the buffer is page-locked and the copy
    non-blocking (the caching host allocator keeps the buffer alive until the copy is done);
    elsewhere `pin` is ignored."""
    sizes = [len(part) for part in parts]
    # numpy converts each part in C (W-GPU's 85k ints: 1.0 ms; one list handed to
    # torch.tensor: 4.1 ms); the engine thread does this before a batch's first kernel
    kind = _NUMPY[dtype]
    arrays = [np.asarray(part, dtype=kind) for part in parts]
    host = torch.from_numpy(np.concatenate(arrays) if arrays else np.empty(0, dtype=kind))
    if device.type == "cuda":
        if pin:
            host = host.pin_memory()
        flat = host.to(device, non_blocking=pin)
    else:
        flat = host.to(device)
    return list(flat.split(sizes))


def shared_prefixes(
    pairs: Sequence[EncodedPair], groups: Sequence[int] | None, share_prefix: bool = True
) -> tuple[list[int], list[int], list[Sequence[int]]]:
    """Per pair: the length of its shared prefix (0: none) and that prefix's index (-1:
    none); and the prefixes' token ids. Pairs with the same group id share their longest
    common token prefix, if it has at least `MIN_SHARED_PREFIX` tokens."""
    prefix_len = [0] * len(pairs)
    prefix_of = [-1] * len(pairs)
    prefix_ids: list[Sequence[int]] = []
    if share_prefix and groups is not None:
        members: dict[int, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        for indices in members.values():
            if len(indices) < 2:
                continue
            seqs = [pairs[i].input_ids for i in indices]
            # keep at least one token per sequence: the score is read at its last token
            shared = min(common_prefix_length(seqs), min(len(s) for s in seqs) - 1)
            if shared < MIN_SHARED_PREFIX:
                continue
            for i in indices:
                prefix_len[i] = shared
                prefix_of[i] = len(prefix_ids)
            prefix_ids.append(seqs[0][:shared])
    return prefix_len, prefix_of, prefix_ids


def pack(
    pairs: Sequence[EncodedPair],
    groups: Sequence[int] | None,
    device: torch.device,
    share_prefix: bool = True,
    pin: bool = True,
) -> PackedBatch:
    """Pack pairs into one stream; pairs with the same group id may share a prefix. `pin`:
    send it through a page-locked buffer, without waiting (CUDA; ignored elsewhere)."""
    prefix_len, prefix_of, prefix_ids = shared_prefixes(pairs, groups, share_prefix)
    ids: list[int] = []
    positions: list[int] = []
    types: list[int] | None = [] if pairs and pairs[0].token_type_ids is not None else None
    starts, lengths, last = [], [], []
    for pair, skip in zip(pairs, prefix_len, strict=True):
        starts.append(len(ids))
        ids.extend(pair.input_ids[skip:])
        positions.extend(range(skip, len(pair)))
        if types is not None:
            types.extend(pair.token_type_ids[skip:])
        lengths.append(len(pair) - skip)
        last.append(len(ids) - 1)
    # one host buffer, one copy: ids, positions, last, starts, lengths, prefixes, token types
    tensors = upload(
        [
            ids,
            positions,
            last,
            starts,
            lengths,
            *prefix_ids,
            *([types] if types is not None else []),
        ],
        device,
        pin,
    )
    input_ids, positions_t, last_t, first_t, counts_t = tensors[:5]
    return PackedBatch(
        input_ids=input_ids,
        positions=positions_t,
        starts=starts,
        lengths=lengths,
        last=last_t,
        prefix_of=prefix_of,
        prefixes=tensors[5 : 5 + len(prefix_ids)],
        token_type_ids=tensors[-1] if types is not None else None,
        first=first_t,
        counts=counts_t,
    )
