"""models/encoder.py: the cross-encoder's last layer computes each sequence's first token only,
with the same hidden states as computing every row."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rerankd.models.encoder import EAGER, Encoder, EncoderConfig, EncoderKernels
from rerankd.ops import attention
from rerankd.ops.batch import pack
from rerankd.ops.prepack import ONEDNN_ROW_MULTIPLE
from rerankd.types import EncodedPair

CONFIG = EncoderConfig(
    vocab_size=200,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)


def _encoder() -> Encoder:
    torch.manual_seed(0)
    model = Encoder(CONFIG).eval()
    with torch.no_grad():  # nonzero biases and norm offsets: padding rows would not stay 0
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.LayerNorm):
                module.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("lengths", [(7, 1, 30, 3, 12), (9,), (5, 6)])
def test_the_last_layer_computes_only_first_tokens_and_gives_the_same_scores(
    monkeypatch, lengths
):
    """The last block's norms and MLP see N rows (padded to oneDNN's row multiple, 16, with
    copies of the first, never 1), the other blocks every row; the first tokens' states and
    the scores equal the every-row forward's (float32)."""
    model = _encoder()
    pairs = [
        EncodedPair(tuple(range(i, i + n)), token_type_ids=(0,) * (n // 2) + (1,) * (n - n // 2))
        for i, n in enumerate(lengths)
    ]
    batch = pack(pairs, None, torch.device("cpu"), share_prefix=False)
    seen: list[torch.Tensor] = []

    def finish(block, x, y):
        seen.append(x)
        return EAGER.finish(block, x, y)

    monkeypatch.setattr(attention, "ONE_QUERY_GROUP", 2)  # groups of two sequences
    with torch.inference_mode():
        expected = model.first_tokens(batch, every_row=True)
        expected_scores = model._score(expected)
        model.kernels = EncoderKernels(EAGER.project, finish)
        got = model.first_tokens(batch)
        scores = model(batch)
    n = len(lengths)
    assert [len(x) for x in seen[:3]] == [sum(lengths), sum(lengths), ONEDNN_ROW_MULTIPLE]
    padded = seen[2]
    copies = padded[:1].expand(ONEDNN_ROW_MULTIPLE - n, -1)
    assert torch.equal(padded[n:], copies)  # copies of a real row
    assert got.shape == (n, CONFIG.hidden_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=1e-5)
