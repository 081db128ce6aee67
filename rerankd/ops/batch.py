"""The packed batch: one flat token stream, per-sequence positions, shared prefixes.

No padding is ever computed. Pairs of the same request usually start with the same tokens
(template + instruction + query); the longest common *token* prefix of each group of pairs
is split off, run once, and every sequence of the group attends to its keys/values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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

    def with_varlen_layout(self) -> PackedBatch:
        """Attach the cu_seqlens/gather layout that varlen attention kernels need."""
        self.varlen = VarlenLayout.build(self)
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

    @classmethod
    def build(cls, batch: PackedBatch) -> VarlenLayout:
        device = batch.input_ids.device
        shared_total = sum(batch.prefix_lengths)
        index: list[int] = []
        k_lengths = []
        for i, (start, length) in enumerate(zip(batch.starts, batch.lengths, strict=True)):
            span = batch.prefix_span(i)
            if span is not None:
                index.extend(range(span[0], span[0] + span[1]))
            index.extend(range(shared_total + start, shared_total + start + length))
            k_lengths.append(length + (span[1] if span else 0))
        return cls(
            cu_seq_q=torch.tensor(
                _offsets(batch.lengths, total=True), dtype=torch.int32, device=device
            ),
            cu_seq_k=torch.tensor(
                _offsets(k_lengths, total=True), dtype=torch.int32, device=device
            ),
            max_q=max(batch.lengths),
            max_k=max(k_lengths),
            gather=torch.tensor(index, dtype=torch.long, device=device),
        )


def _offsets(lengths: Sequence[int], total: bool = False) -> list[int]:
    """Start offsets of consecutive spans (with the end appended when `total`)."""
    out, position = [], 0
    for n in lengths:
        out.append(position)
        position += n
    return [*out, position] if total else out


def pack(
    pairs: Sequence[EncodedPair],
    groups: Sequence[int] | None,
    device: torch.device,
    share_prefix: bool = True,
) -> PackedBatch:
    """Pack pairs into one stream; pairs with the same group id may share a prefix."""
    prefix_len = [0] * len(pairs)
    prefix_of = [-1] * len(pairs)
    prefixes: list[torch.Tensor] = []
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
                prefix_of[i] = len(prefixes)
            prefixes.append(torch.tensor(seqs[0][:shared], dtype=torch.long, device=device))
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
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        starts=starts,
        lengths=lengths,
        last=torch.tensor(last, dtype=torch.long, device=device),
        prefix_of=prefix_of,
        prefixes=prefixes,
        token_type_ids=None
        if types is None
        else torch.tensor(types, dtype=torch.long, device=device),
    )
