"""The bucketed row layout a captured CUDA graph replays (ops/static_batch.py): every batch
of a bucket has the bucket's shapes, every document attends to exactly its own tokens and
its prefix's, and every row belongs to a sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rerankd.ops.batch import shared_prefixes
from rerankd.ops.static_batch import (
    MIN_LENGTH,
    PAD_SEQUENCE,
    ROW_STEPS,
    Bucket,
    StaticInputs,
    bucket_size,
    length_bucket,
    row_layout,
)
from rerankd.types import EncodedPair

CPU = torch.device("cpu")


@pytest.mark.parametrize("n", [1, 63, 64, 65, 100, 1000, 4097, 41_000, 65_536, 70_001])
def test_bucket_size_rounds_up_on_a_grid_with_little_padding(n):
    size = bucket_size(n, ROW_STEPS, 64)
    assert size >= n and size >= 64
    if n >= 64 * ROW_STEPS:  # on the grid: at most one step of 1/ROW_STEPS of n's octave
        assert size - n < n / ROW_STEPS
    assert bucket_size(size, ROW_STEPS, 64) == size  # a bucket is its own bucket


def test_bucket_sizes_recur_so_graphs_are_reused():
    """Row counts of a steady workload (W-GPU: ~41k rows, +-3 %) land in a handful of
    buckets: the point of bucketing."""
    assert len({bucket_size(n, ROW_STEPS, 64) for n in range(40_000, 42_500)}) <= 3


@pytest.mark.parametrize(("n", "want"), [(0, 128), (1, 128), (128, 128), (129, 256), (600, 1024)])
def test_length_bucket_is_a_power_of_two_from_the_minimum(n, want):
    assert length_bucket(n) == want >= MIN_LENGTH


def _pairs(lengths, shared=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = tuple(torch.randint(1, 1000, (shared,), generator=g).tolist())
    return [
        EncodedPair(prefix + tuple(torch.randint(1, 1000, (n,), generator=g).tolist()))
        for n in lengths
    ]


def _check_layout(pairs, groups):
    """Every invariant a replay relies on."""
    layout = row_layout(pairs, groups)
    b = layout.bucket
    prefix_len, _, prefix_ids = shared_prefixes(pairs, groups)
    ids, positions, gather = layout.ids, layout.positions, layout.gather
    sequences = len(layout.cu_q) - 1
    # shapes within the bucket; every row in exactly one sequence, in row order
    assert len(ids) == len(positions) == b.rows
    assert layout.cu_q[0] == 0 and layout.cu_q[-1] == b.rows
    if gather is None:  # no prefix formed: keys are the queries' own rows, not gathered
        assert not prefix_ids and b.keys == 0 and layout.cu_k == layout.cu_q
        gather = np.arange(b.rows)
    assert len(layout.cu_k) == len(layout.cu_q) and layout.cu_k[-1] == len(gather)
    assert b.keys == 0 or len(gather) <= b.keys
    assert sequences <= b.sequences
    q_lengths = [e - s for s, e in zip(layout.cu_q, layout.cu_q[1:], strict=False)]
    k_lengths = [e - s for s, e in zip(layout.cu_k, layout.cu_k[1:], strict=False)]
    assert min(q_lengths) >= 1 and max(q_lengths) <= b.max_q and max(k_lengths) <= b.max_k
    # prefixes first (keys: themselves), then one sequence per document whose keys are the
    # pair's whole token sequence, positions counting from 0, queries its unshared tokens
    for i, prefix in enumerate(prefix_ids):
        keys = gather[layout.cu_k[i] : layout.cu_k[i + 1]]
        assert ids[keys].tolist() == list(prefix)
    for d, pair in enumerate(pairs):
        s = len(prefix_ids) + d
        keys = gather[layout.cu_k[s] : layout.cu_k[s + 1]]
        assert ids[keys].tolist() == list(pair.input_ids)
        assert positions[keys].tolist() == list(range(len(pair)))
        q0, q1 = layout.cu_q[s], layout.cu_q[s + 1]
        assert q1 - q0 == len(pair) - prefix_len[d]
        assert keys[-(q1 - q0) :].tolist() == list(range(q0, q1))  # its own rows, last
        assert layout.last[d] == q1 - 1
        assert layout.first[d] == q0
    # padding: short sequences of their own, attending to themselves only
    for s in range(len(prefix_ids) + len(pairs), sequences):
        assert q_lengths[s] <= PAD_SEQUENCE
        keys = gather[layout.cu_k[s] : layout.cu_k[s + 1]]
        assert keys.tolist() == list(range(layout.cu_q[s], layout.cu_q[s + 1]))
    return layout


def test_layout_of_documents_sharing_prefixes_in_two_groups():
    pairs = _pairs([5, 1, 30], shared=12) + _pairs([7, 9], shared=20, seed=1)
    layout = _check_layout(pairs, [0, 0, 0, 1, 1])
    assert layout.cu_q[1] == 12 and layout.cu_q[2] == 32  # two prefix sequences first
    assert layout.documents == 5


def test_layout_without_groups_shares_nothing_and_gathers_nothing():
    pairs = _pairs([5, 1, 30], shared=12)
    layout = _check_layout(pairs, None)
    assert layout.cu_q[1] == len(pairs[0])  # the first document is the first sequence
    assert layout.gather is None and layout.bucket.keys == 0


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    shared=st.integers(0, 40),
    group_count=st.integers(1, 3),
)
def test_layout_invariants_hold_for_any_batch(lengths, shared, group_count):
    pairs = _pairs(lengths, shared=shared)
    _check_layout(pairs, [i % group_count for i in range(len(pairs))])


def test_same_lengths_in_another_order_share_a_bucket():
    """Reversed (the engine's second start-up probe), a batch keeps its bucket: one graph
    serves both, with other offsets in its buffers."""
    pairs = _pairs([5, 90, 30, 12], shared=40)
    groups = [0, 0, 1, 1]
    a, b = row_layout(pairs, groups), row_layout(pairs[::-1], groups[::-1])
    assert a.bucket == b.bucket
    assert a.cu_q != b.cu_q


def test_static_inputs_hold_a_layout_with_unused_slots_empty():
    pairs = _pairs([5, 9, 3], shared=10)
    layout = row_layout(pairs, [0, 0, 0])
    inputs = StaticInputs(layout.bucket, CPU)
    inputs.fill(layout)
    b, varlen = layout.bucket, inputs.batch.varlen
    assert inputs.batch.input_ids.tolist() == layout.ids.tolist()
    assert inputs.batch.positions.tolist() == layout.positions.tolist()
    assert inputs.batch.token_type_ids is None
    cu_q = varlen.cu_seq_q.tolist()
    assert len(cu_q) == b.sequences + 1 and varlen.cu_seq_q.dtype == torch.int32
    assert cu_q[: len(layout.cu_q)] == layout.cu_q
    assert set(cu_q[len(layout.cu_q) :]) <= {layout.cu_q[-1]}  # empty sequences
    assert varlen.cu_seq_k.tolist()[-1] == layout.cu_k[-1]
    assert inputs.last.tolist() == layout.last + [0] * (b.sequences - len(pairs))
    assert inputs.first.tolist() == layout.first + [0] * (b.sequences - len(pairs))
    assert varlen.gather.tolist()[: len(layout.gather)] == layout.gather.tolist()
    assert (varlen.max_q, varlen.max_k, varlen.stream_keys) == (b.max_q, b.max_k, True)


def test_encoder_layout_gathers_no_keys_and_carries_token_types():
    """Without prefix sharing (encoders: bidirectional) each sequence's keys are its own
    rows, where its queries are: no gather, key offsets = query offsets; token types ride
    along (padding: type 0), and the [CLS] rows are each sequence's first."""
    pairs = [
        EncodedPair(p.input_ids, tuple(i % 2 for i in range(len(p))))
        for p in _pairs([5, 9, 3, 140], shared=10)
    ]
    layout = row_layout(pairs, [0, 0, 0, 0], share_prefix=False)
    b = layout.bucket
    assert b.keys == 0 and b.types and layout.gather is None
    assert layout.cu_k == layout.cu_q and b.max_k == b.max_q
    assert layout.first == layout.cu_q[: len(pairs)]
    assert layout.types.tolist()[: layout.cu_q[len(pairs)]] == [
        t for p in pairs for t in p.token_type_ids
    ]
    assert set(layout.types.tolist()[layout.cu_q[len(pairs)] :]) <= {0}
    inputs = StaticInputs(b, CPU)
    inputs.fill(layout)
    assert inputs.batch.token_type_ids.tolist() == layout.types.tolist()
    assert inputs.batch.varlen.gather.numel() == 0 and not inputs.batch.varlen.stream_keys
    assert inputs.batch.varlen.cu_seq_k.tolist() == inputs.batch.varlen.cu_seq_q.tolist()
    assert inputs.first.tolist()[: len(pairs)] == layout.first


def test_static_inputs_refuse_a_layout_of_another_bucket():
    inputs = StaticInputs(Bucket(64, 16, 64, 128, 128), CPU)
    with pytest.raises(ValueError, match="into buffers of"):
        inputs.fill(row_layout(_pairs([200]), None))
