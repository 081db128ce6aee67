"""Packing: flat streams, per-sequence positions, shared token prefixes per request."""

from __future__ import annotations

import torch

from rerankd.ops.batch import MIN_SHARED_PREFIX, common_prefix_length, pack
from rerankd.types import EncodedPair

CPU = torch.device("cpu")
PREFIX = tuple(range(100, 100 + MIN_SHARED_PREFIX + 2))


def pair(*ids: int) -> EncodedPair:
    return EncodedPair(tuple(ids))


def test_common_prefix_length():
    assert common_prefix_length([(1, 2, 3), (1, 2, 4), (1, 2)]) == 2
    assert common_prefix_length([(1,), (2,)]) == 0
    assert common_prefix_length([(5, 6)]) == 2


def test_pack_without_groups_is_flat_and_unshared():
    packed = pack([pair(1, 2, 3), pair(4, 5)], None, CPU)
    assert packed.input_ids.tolist() == [1, 2, 3, 4, 5]
    assert packed.positions.tolist() == [0, 1, 2, 0, 1]
    assert packed.starts == [0, 3] and packed.lengths == [3, 2]
    assert packed.last.tolist() == [2, 4]
    assert packed.prefixes == [] and packed.prefix_of == [-1, -1]


def test_pack_splits_the_common_token_prefix_of_each_group():
    pairs = [pair(*PREFIX, 1, 2), pair(*PREFIX, 3), pair(*PREFIX, 4, 5, 6), pair(7, 8)]
    packed = pack(pairs, [0, 0, 1, 1], CPU)
    # group 0 shares PREFIX; group 1's pairs share nothing
    assert len(packed.prefixes) == 1 and packed.prefixes[0].tolist() == list(PREFIX)
    assert packed.prefix_of == [0, 0, -1, -1]
    n = len(PREFIX)
    assert packed.input_ids.tolist() == [1, 2, 3, *PREFIX, 4, 5, 6, 7, 8]
    assert packed.positions.tolist()[:3] == [n, n + 1, n]  # positions continue after the prefix
    assert packed.last.tolist() == [1, 2, 3 + n + 2, 3 + n + 4]


def test_identical_pairs_keep_their_last_token_unshared():
    pairs = [pair(*PREFIX), pair(*PREFIX)]
    packed = pack(pairs, [0, 0], CPU)
    assert packed.prefixes[0].tolist() == list(PREFIX[:-1])
    assert packed.lengths == [1, 1]


def test_short_prefixes_and_singletons_are_not_shared():
    short = PREFIX[: MIN_SHARED_PREFIX - 1]
    assert pack([pair(*short, 1), pair(*short, 2)], [0, 0], CPU).prefixes == []
    assert pack([pair(*PREFIX, 1)], [0], CPU).prefixes == []
    assert (
        pack([pair(*PREFIX, 1), pair(*PREFIX, 2)], [0, 0], CPU, share_prefix=False).prefixes == []
    )


# --- host to device: one buffer, one copy; `pin` (CUDA) ------------------------------------


def _layout(packed) -> dict:
    """Everything a packed batch holds, as plain values."""
    varlen = packed.varlen
    return {
        "ids": packed.input_ids.tolist(),
        "positions": packed.positions.tolist(),
        "last": packed.last.tolist(),
        "prefixes": [p.tolist() for p in packed.prefixes],
        "types": None if packed.token_type_ids is None else packed.token_type_ids.tolist(),
        "layout": (packed.starts, packed.lengths, packed.prefix_of),
        "varlen": None
        if varlen is None
        else (
            varlen.cu_seq_q.tolist(),
            varlen.cu_seq_k.tolist(),
            varlen.max_q,
            varlen.max_k,
            varlen.gather.tolist(),
            varlen.cu_seq_q.dtype,
            varlen.gather.dtype,
        ),
    }


def test_pin_is_ignored_on_cpu_and_packs_the_same_values():
    pairs = [pair(*PREFIX, 1, 2), pair(*PREFIX, 3), pair(9, *PREFIX), pair(7, 8)]
    groups = [0, 0, 1, 1]
    plain = pack(pairs, groups, CPU, pin=False).with_varlen_layout(pin=False)
    pinned = pack(pairs, groups, CPU).with_varlen_layout()  # pin: the default
    assert _layout(plain) == _layout(pinned)
    assert not pinned.input_ids.is_pinned()  # nothing page-locked without CUDA
    assert pinned.input_ids.dtype == torch.long and pinned.varlen.cu_seq_q.dtype == torch.int32


def test_one_upload_holds_every_integer_tensor_of_the_batch_in_order():
    typed = [
        EncodedPair((*PREFIX, 1, 2), token_type_ids=(0,) * len(PREFIX) + (1, 1)),
        EncodedPair((*PREFIX, 3), token_type_ids=(0,) * len(PREFIX) + (1,)),
    ]
    packed = pack(typed, [0, 0], CPU)
    assert packed.token_type_ids.tolist() == [1, 1, 1]
    assert packed.prefixes[0].tolist() == list(PREFIX)
    # views of one host buffer: ids, positions, last, prefixes, token types
    base = packed.input_ids.untyped_storage().data_ptr()
    for tensor in (packed.positions, packed.last, packed.prefixes[0], packed.token_type_ids):
        assert tensor.untyped_storage().data_ptr() == base
        assert tensor.is_contiguous()


def test_an_empty_batch_packs_to_empty_tensors():
    packed = pack([], None, CPU, pin=True)
    assert packed.input_ids.numel() == packed.last.numel() == 0 and packed.prefixes == []
