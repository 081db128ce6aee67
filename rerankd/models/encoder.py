"""A compact BERT / XLM-RoBERTa cross-encoder that runs packed batches.

Config at the top, then Model → Block → Attention → MLP, the classification heads, the
per-token kernels, and the checkpoint mapping at the bottom. Bidirectional attention means no
prefix can be shared; packing still means no padding token is ever computed.

The per-token work around attention (projections, residuals, norms, GELU) runs eager, or
compiled when the engine asks (`set_kernels`). With int8 linears the eager activation
quantization took ~75 % of a forward; compiled, it fuses into the norm or GELU before each
GEMM (W-ENC request, 6-layer XLM-R large shape, 2-core Xeon with AMX: 5.2 s -> 1.7 s). In
bf16 compiled and eager measured the same there (1.70 vs 1.71 s on 8 documents).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rerankd.models.kernels import Kernels, refuse_unless
from rerankd.models.loader import UnsupportedCheckpoint
from rerankd.models.weights import Checkpoint
from rerankd.ops.attention import ATTENTION, one_query_attention
from rerankd.ops.attention_speed import AttentionShape
from rerankd.ops.batch import PackedBatch
from rerankd.ops.compile_cache import key_compile_cache_by_cpu_isa
from rerankd.ops.prepack import ONEDNN_ROW_MULTIPLE, activated_linear, residual_linear
from rerankd.ops.static_batch import StaticInputs

#: position ids of RoBERTa-family models start after the padding index
_ROBERTA_TYPES = {"xlm-roberta": "roberta", "roberta": "roberta", "camembert": "roberta"}
_BERT_TYPES = {"bert": "bert"}


@dataclass
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    #: added to 0-based positions (RoBERTa: padding_idx + 1)
    position_offset: int = 0
    #: "bert" (pooler + classifier) or "roberta" (dense + tanh + out_proj on <s>)
    head: str = "bert"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf: Any) -> EncoderConfig:
        family = _ROBERTA_TYPES.get(hf.model_type) or _BERT_TYPES.get(hf.model_type)
        if family is None:
            raise UnsupportedCheckpoint(f"no packed encoder for model_type {hf.model_type!r}")
        if getattr(hf, "hidden_act", "gelu") != "gelu":
            raise UnsupportedCheckpoint(f"activation {hf.hidden_act!r} is not implemented")
        if getattr(hf, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise UnsupportedCheckpoint("only absolute position embeddings are implemented")
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=hf.type_vocab_size,
            layer_norm_eps=hf.layer_norm_eps,
            position_offset=(hf.pad_token_id + 1) if family == "roberta" else 0,
            head=family,
        )


# ---------------------------------------------------------------------------------------


class EncoderBackbone(nn.Module):
    """BERT/XLM-R embeddings and post-norm blocks: the part the cross-encoder (`Encoder`)
    and ColBERT (models/colbert.py) share, with the same parameter names."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = self.config = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))

    def embed(self, batch: PackedBatch) -> Tensor:
        """Word + position + token-type embeddings, normalized: (T, hidden)."""
        types = (
            batch.token_type_ids
            if batch.token_type_ids is not None
            else torch.zeros_like(batch.input_ids)
        )
        x = (
            self.word_embeddings(batch.input_ids)
            + self.position_embeddings(batch.positions + self.config.position_offset)
            + self.token_type_embeddings(types)
        )
        return self.embed_norm(x)

    def _use_attention(self, attend: Callable) -> None:
        for layer in self.layers:
            layer.attention.attend = attend


class Encoder(EncoderBackbone):
    """Embeddings + layers + classification head → raw scores (N,) in float32."""

    compiles = True  # `compiled_kernels`: models/kernels.py's contract

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        c = config
        # BERT: pooler (dense + tanh) then classifier; RoBERTa: dense + tanh then out_proj
        self.head_dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.head_out = nn.Linear(c.hidden_size, 1)
        self.kernels = EAGER
        self._compiled: EncoderKernels | None = None  # made on first use

    @property
    def attention_shape(self) -> AttentionShape:
        """What the engine times candidate attention kernels on."""
        c = self.config
        return AttentionShape(c.num_heads, c.num_heads, c.head_dim, causal=False)

    def set_kernels(self, kernels: Kernels) -> None:
        """Run the engine's choice of kernels (models/kernels.py): every layer's attention
        kernel, and eager or compiled per-token functions (compiled on first use)."""
        refuse_unless(self, kernels)
        self._use_attention(ATTENTION[kernels.attention])
        if kernels.compiled and self._compiled is None:
            self._compiled = compiled_kernels()
        self.kernels = self._compiled if kernels.compiled else EAGER

    def forward_rows(self, inputs: StaticInputs) -> Tensor:
        """Raw scores (sequence slots,) of a bucketed stream (ops/static_batch.py, unused
        slots read row 0: the caller keeps the first N): every row of every layer computed,
        every shape set by the bucket and no host data in the forward, so one captured CUDA
        graph serves its batches (engine/cuda_graphs.py)."""
        return self._score(self.first_tokens(inputs.batch, every_row=True))

    def forward(self, batch: PackedBatch) -> Tensor:
        return self._score(self.first_tokens(batch))

    def first_tokens(self, batch: PackedBatch, every_row: bool = False) -> Tensor:
        """Hidden states (N, hidden) of each sequence's first token ([CLS] / <s>) after the
        last layer, which computes those rows only (`Block.first_tokens`) unless
        `every_row`."""
        x = self.embed(batch)
        for index, layer in enumerate(self.layers):
            if index == len(self.layers) - 1 and not every_row:
                return layer.first_tokens(x, batch, self.kernels)
            x = layer(x, batch, self.kernels)
        return x[batch.first]

    def _score(self, first: Tensor) -> Tensor:
        """The classification head on the first tokens' states: raw scores (N,)."""
        pooled = torch.tanh(self.head_dense(first))
        return self.head_out(pooled)[:, 0].float()


class Block(nn.Module):
    """Post-norm transformer layer (BERT style)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, x: Tensor, batch: PackedBatch, kernels: EncoderKernels | None = None
    ) -> Tensor:
        kernels = kernels or EAGER
        c = self.attention.config
        q, k, v = self._project(x, kernels)
        y = self.attention.attend(q, k, v, batch, None, causal=False, scale=c.head_dim**-0.5)
        return kernels.finish(self, x, y.reshape(len(x), c.hidden_size))

    def _project(self, x: Tensor, kernels: EncoderKernels) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (T, H, D) each of every row: (T, 3 * hidden) -> (T, 3, H, D), split."""
        c = self.attention.config
        return kernels.project(self, x).view(len(x), 3, c.num_heads, c.head_dim).unbind(dim=1)

    def first_tokens(
        self, x: Tensor, batch: PackedBatch, kernels: EncoderKernels | None = None
    ) -> Tensor:
        """The block's output (N, hidden) at each sequence's first token only: keys and
        values of every row, then attention, output projection, norms and MLP for those N
        rows. A cross-encoder's last layer is read nowhere else (a 12-layer MiniLM: 1/12 of
        its per-token work)."""
        kernels = kernels or EAGER
        c = self.attention.config
        q, k, v = self._project(x, kernels)
        rows = batch.first
        y = one_query_attention(q[rows], k, v, batch, 0, c.head_dim**-0.5)
        n = len(rows)
        # a recurring row count (oneDNN builds a GEMM per new one; a compiled function
        # would specialize on 1), padded with copies of the first row rather than zeros:
        # biases and norms make zero rows nonzero, which could move an int8 linear's
        # per-tensor activation scale; a copy of a real row cannot
        pad = max(-n % ONEDNN_ROW_MULTIPLE, 2 - n)
        rows = torch.cat((rows, rows[:1].expand(pad)))
        y = torch.cat((y, y[:1].expand(pad, *y.shape[1:]))).view(n + pad, c.hidden_size)
        return kernels.finish(self, x[rows], y)[:n]


class Attention(nn.Module):
    """The fused q ‖ k ‖ v and output projections; `Block` runs them around `attend`."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # fused q ‖ k ‖ v
        self.wo = nn.Linear(config.hidden_size, config.hidden_size)
        self.attend = ATTENTION["sdpa"]


class MLP(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(activated_linear(self.w1, x, "gelu"))


# --- per-token kernels --------------------------------------------------------------------


def project_tokens(block: Block, x: Tensor) -> Tensor:
    """q ‖ k ‖ v of a chunk of tokens: (T, hidden) -> (T, 3 * hidden)."""
    return block.attention.wqkv(x)


def finish_tokens(block: Block, x: Tensor, y: Tensor) -> Tensor:
    """Output projection, residual, norm, MLP, residual, norm (post-norm, BERT order):
    x (T, hidden) the block's input, y (T, hidden) the attention output. The residual adds
    ride the GEMM epilogue where the linear has one (prepacked / int8: `plus`), and so does
    GELU where it is prepacked (`activated`)."""
    x = block.attention_norm(residual_linear(x, block.attention.wo, y))
    mlp = block.mlp
    return block.mlp_norm(residual_linear(x, mlp.w2, activated_linear(mlp.w1, x, "gelu")))


@dataclass(frozen=True)
class EncoderKernels:
    """The per-token functions a block calls: eager, or compiled by `compiled_kernels`."""

    project: Callable
    finish: Callable


EAGER = EncoderKernels(project_tokens, finish_tokens)


def compiled_kernels() -> EncoderKernels:
    """`torch.compile`d per-token functions (dynamic shapes: one compile serves every token
    count; parameters are graph inputs, so all layers share one graph). Int8 GEMMs are
    custom ops inside the graph (`onednn_ops`), so each input quantization fuses with the
    norm or GELU that produces it. Inductor's cache is keyed by the CPU's vector ISA first:
    entries shared with a process of another ISA overran their buffers (ops/compile_cache)."""
    key_compile_cache_by_cpu_isa()
    return EncoderKernels(
        torch.compile(project_tokens, dynamic=True), torch.compile(finish_tokens, dynamic=True)
    )


# --- checkpoint mapping -----------------------------------------------------------------------


def backbone_state(get: Callable[[str], Tensor], base: str, num_layers: int) -> dict:
    """`EncoderBackbone`'s state from a BERT/XLM-R checkpoint whose backbone tensors are
    named under `base` (`get` reads one, on the model's device and dtype); q, k and v are
    joined into one projection."""
    emb = base + "embeddings."
    state = {
        "word_embeddings.weight": get(emb + "word_embeddings.weight"),
        "position_embeddings.weight": get(emb + "position_embeddings.weight"),
        "token_type_embeddings.weight": get(emb + "token_type_embeddings.weight"),
        "embed_norm.weight": get(emb + "LayerNorm.weight"),
        "embed_norm.bias": get(emb + "LayerNorm.bias"),
    }
    for i in range(num_layers):
        src, dst = f"{base}encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            state[dst + f"attention.wqkv.{kind}"] = torch.cat(
                [get(src + f"attention.self.{n}.{kind}") for n in ("query", "key", "value")]
            )
            state[dst + f"attention.wo.{kind}"] = get(src + f"attention.output.dense.{kind}")
            state[dst + f"attention_norm.{kind}"] = get(src + f"attention.output.LayerNorm.{kind}")
            state[dst + f"mlp.w1.{kind}"] = get(src + f"intermediate.dense.{kind}")
            state[dst + f"mlp.w2.{kind}"] = get(src + f"output.dense.{kind}")
            state[dst + f"mlp_norm.{kind}"] = get(src + f"output.LayerNorm.{kind}")
    return state


def load_encoder(
    checkpoint: Checkpoint, config: EncoderConfig, dtype: torch.dtype, device: torch.device
) -> Encoder:
    """Map a BERT/XLM-R *ForSequenceClassification checkpoint onto `Encoder`."""
    base = "bert." if config.head == "bert" else "roberta."

    def get(name: str) -> Tensor:
        return checkpoint.get(name).to(device=device, dtype=dtype)

    state = backbone_state(get, base, config.num_layers)
    dense, out = (
        ("bert.pooler.dense", "classifier")
        if config.head == "bert"
        else ("classifier.dense", "classifier.out_proj")
    )
    for kind in ("weight", "bias"):
        state[f"head_dense.{kind}"] = get(f"{dense}.{kind}")
        state[f"head_out.{kind}"] = get(f"{out}.{kind}")
    if state["head_out.weight"].shape[0] != 1:
        raise UnsupportedCheckpoint("only one-label classification heads are rerankers")
    with torch.device("meta"):
        model = Encoder(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
