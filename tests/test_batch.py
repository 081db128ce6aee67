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
