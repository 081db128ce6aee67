"""oneDNN-prepacked linear layers (bf16 on CPU) give exactly F.linear's outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rerankd.engine.prepack import PrepackedLinear, prepack_linears, prepack_supported

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    not prepack_supported(CPU, torch.bfloat16), reason="this torch build has no oneDNN prepack"
)


@pytest.mark.parametrize("tokens", [1, 7, 300, 1024, 1500])
def test_prepacked_linear_equals_f_linear_for_any_token_count(tokens):
    torch.manual_seed(tokens)
    weight = (torch.randn(96, 64) * 0.05).bfloat16()
    x = torch.randn(tokens, 64).bfloat16()
    assert torch.equal(PrepackedLinear(weight)(x), F.linear(x, weight))


def test_prepack_swaps_bias_free_bf16_linears_only():
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Linear(32, 8, bias=True))
    model = model.bfloat16()
    x = torch.randn(5, 16).bfloat16()
    expected = model(x)
    assert prepack_linears(model, CPU, torch.bfloat16) == 1
    assert isinstance(model[0], PrepackedLinear) and type(model[1]) is nn.Linear
    assert torch.equal(model(x), expected)
    # float32 keeps F.linear (the exact reference path)
    plain = nn.Sequential(nn.Linear(16, 32, bias=False))
    assert prepack_linears(plain, CPU, torch.float32) == 0


def test_the_packed_decoder_uses_prepacked_linears_in_bf16(qwen3_dir):
    from rerankd.metrics import Metrics
    from rerankd.runtime import load_model
    from rerankd.settings import Settings

    def linears(dtype: str) -> set[type]:
        settings = Settings(model=str(qwen3_dir), dtype=dtype, device="cpu", compile="off")
        model = load_model(settings, Metrics()).scheduler.engine.model
        return {type(m) for m in model.modules() if isinstance(m, nn.Linear | PrepackedLinear)}

    assert linears("bfloat16") == {PrepackedLinear}
    assert linears("float32") == {nn.Linear}
