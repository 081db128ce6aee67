"""What every engine shares (engine/base.py): the batch budget and the padded sub-batches."""

from __future__ import annotations

import pytest
import torch

from rerankd.engine.base import default_batch_tokens, padded_chunks
from rerankd.engine.packed_engine import check_modes


def test_default_batch_tokens_per_device_and_padding():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_batch_tokens(cpu) == default_batch_tokens(cpu, padded=True) == 8192
    assert default_batch_tokens(cuda) == 65536  # the packed engine: one W-GPU request
    assert default_batch_tokens(cuda, padded=True) == 32768


def test_padded_chunks_sort_longest_first_and_fit_the_budget():
    lengths = [3, 10, 0, 7, 7, 1]
    chunks = list(padded_chunks(lengths, 20))
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    assert chunks[0] == [1, 3]  # width 10: two rows fit 20 tokens
    for chunk in chunks:
        assert max(1, lengths[chunk[0]]) * len(chunk) <= 20 or len(chunk) == 1
        assert lengths[chunk[0]] == max(lengths[i] for i in chunk)


def test_an_item_wider_than_the_budget_still_runs_alone():
    assert list(padded_chunks([50, 5], 16)) == [[0], [1]]


@pytest.mark.parametrize(
    ("modes", "message"),
    [
        (("fp4", "off", "auto"), "unknown --quantize 'fp4'; use none, int8 or fp8"),
        (("none", "maybe", "auto"), "unknown --compile 'maybe'; use auto, on or off"),
        (("none", "off", "flash"), "unknown --attention 'flash'; use auto, sdpa, amx or avx512"),
    ],
)
def test_mode_errors_name_the_flag_and_its_choices(modes, message):
    with pytest.raises(ValueError) as info:
        check_modes(*modes)
    assert str(info.value) == message
