"""CPU tunings stay on CPU: the per-token chunking switch, tested by its device type."""

from __future__ import annotations

import torch

from rerankd.models import decoder
from rerankd.models.decoder import Decoder, DecoderConfig, TokenFunctions
from rerankd.ops.batch import pack
from rerankd.types import EncodedPair


def test_chunks_are_cpu_only():
    assert decoder.EAGER_TOKENS.chunk_for("cpu") == decoder.TOKEN_CHUNK
    assert decoder.EAGER_TOKENS.chunk_for("cuda") is None
    compiled = TokenFunctions(decoder.project_tokens, decoder.finish_tokens, 4096)
    assert compiled.chunk_for("cpu") == 4096 and compiled.chunk_for("cuda") is None


class _Counting(TokenFunctions):
    """Eager per-token functions that count their calls and take the chunking of `device_type`."""

    def __init__(self, device_type: str) -> None:
        super().__init__(self._project, self._finish)
        object.__setattr__(self, "device_type", device_type)
        object.__setattr__(self, "calls", [])

    def _project(self, block, x, cos, sin):
        self.calls.append(("project", len(x)))
        return decoder.project_tokens(block, x, cos, sin)

    def _finish(self, block, x, y):
        self.calls.append(("finish", len(x)))
        return decoder.finish_tokens(block, x, y)

    def chunk_for(self, device_type: str) -> int | None:
        return super().chunk_for(self.device_type)


def test_cuda_switch_runs_each_layer_in_one_chunk_with_the_same_hidden_states():
    config = DecoderConfig(
        vocab_size=300,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        qk_norm=True,
    )
    torch.manual_seed(0)
    model = Decoder(config).eval()
    shared = tuple(range(10, 60))
    pairs = [EncodedPair(shared + tuple((7 * i + j) % 300 for j in range(900))) for i in range(3)]
    batch = pack(pairs, [0, 0, 0], torch.device("cpu"))
    outputs = {}
    for device_type in ("cpu", "cuda"):
        tokens = _Counting(device_type)
        model.tokens = tokens
        with torch.inference_mode():
            outputs[device_type] = model(batch)
        outputs[device_type + "-calls"] = tokens.calls
    model.tokens = decoder.EAGER_TOKENS
    cpu_projects = [n for kind, n in outputs["cpu-calls"] if kind == "project"]
    cuda_calls = outputs["cuda-calls"]
    assert len(cpu_projects) == 3 * config.num_layers  # 2,750 tokens in 1,024-token chunks
    assert len(cuda_calls) == 2 * config.num_layers  # one project, one finish per layer
    assert cuda_calls[0] == ("project", 50 + 3 * 900)
    torch.testing.assert_close(outputs["cuda"], outputs["cpu"], atol=1e-5, rtol=1e-5)


def test_cuda_attention_with_no_fused_kernel_left_warns_before_falling_back_to_sdpa(
    monkeypatch, caplog
):
    """On CUDA, when every fused kernel fails to load or disagrees, the engine still serves
    (per-sequence SDPA) but says at WARNING that this is the slow path."""
    import logging
    from types import SimpleNamespace

    from rerankd.engine import packed_engine
    from rerankd.engine.packed_engine import PackedEngine

    monkeypatch.setattr(packed_engine, "cuda_backends", lambda: ["varlen", "flex"])
    refusing = SimpleNamespace(_attention_agrees=lambda backend: False)
    agreeing = SimpleNamespace(_attention_agrees=lambda backend: backend == "flex")
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger=packed_engine.__name__):
        assert PackedEngine._pick_attention(agreeing, "auto", cuda, torch.bfloat16) == "flex"
        assert caplog.text == ""
        assert PackedEngine._pick_attention(refusing, "auto", cuda, torch.bfloat16) == "sdpa"
    assert "no fused CUDA attention kernel" in caplog.text and "math kernel" in caplog.text
