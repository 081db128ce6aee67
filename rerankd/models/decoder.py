"""A compact decoder-only transformer (Qwen3, Qwen2, Gemma) that runs packed batches.

Config at the top (`DecoderConfig.from_hf_config` reads each family's Hugging Face config,
or says why our code can't run it), then Model → Block → Attention → MLP → Norm, the score
head, and pure helpers at the bottom; loading is decoder_weights.py's. The model computes
hidden states only; `DecoderReranker` applies the final norm and the score head at each
sequence's last token. It knows nothing about tokenization or requests. Which attention
kernel it runs, and whether its per-token work is compiled, is the engine's choice
(`set_kernels`, models/kernels.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rerankd.models.kernels import Kernels, refuse_unless
from rerankd.models.loader import UnsupportedCheckpoint
from rerankd.ops.attention import ATTENTION, PrefixKV, one_query_attention
from rerankd.ops.attention_speed import AttentionShape
from rerankd.ops.batch import PackedBatch
from rerankd.ops.compile_cache import key_compile_cache_by_cpu_isa
from rerankd.ops.prepack import residual_linear
from rerankd.ops.static_batch import StaticInputs

#: the `model_type`s `DecoderConfig.from_hf_config` reads
DECODER_TYPES = ("qwen3", "qwen2", "gemma")


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    #: Qwen3 normalizes q and k per head before RoPE
    qk_norm: bool = False
    #: Gemma's RMSNorm scales by (1 + w) and multiplies in float32
    gemma_norm: bool = False
    #: Gemma multiplies embeddings by sqrt(hidden_size)
    embed_scale: float = 1.0
    activation: str = "silu"

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    @classmethod
    def from_hf_config(cls, hf_config: Any, model_type: str | None = None) -> DecoderConfig:
        """Qwen3; Qwen2/2.5 (mxbai-rerank-v2: Qwen3 minus the q/k norms, plus q/k/v biases
        that `load_decoder` fuses); Gemma (bge-reranker-v2-gemma). By `model_type` (the
        config's unless given); UnsupportedCheckpoint for what our code does not implement."""
        model_type = model_type or getattr(hf_config, "model_type", None)
        if model_type in ("qwen3", "qwen2"):
            if getattr(hf_config, "use_sliding_window", False):
                raise UnsupportedCheckpoint("sliding-window attention is not implemented")
            act = getattr(hf_config, "hidden_act", "silu")
            if act != "silu":
                family = "Qwen3" if model_type == "qwen3" else "Qwen2"
                raise UnsupportedCheckpoint(f"{family} activation {act!r} is not implemented")
            return cls.llama_like(hf_config, qk_norm=model_type == "qwen3", activation="silu")
        if model_type == "gemma":
            act = getattr(hf_config, "hidden_act", None) or getattr(
                hf_config, "hidden_activation", None
            )
            if act not in ("gelu_pytorch_tanh", "gelu"):  # transformers maps "gelu" to tanh too
                raise UnsupportedCheckpoint(f"Gemma activation {act!r} is not implemented")
            return cls.llama_like(
                hf_config,
                gemma_norm=True,
                embed_scale=math.sqrt(hf_config.hidden_size),
                activation="gelu_tanh",
            )
        raise UnsupportedCheckpoint(f"no packed decoder for model_type {model_type!r}")

    @classmethod
    def llama_like(cls, hf_config: Any, **family: Any) -> DecoderConfig:
        """The fields every Llama-family config shares, plus the family's own (`family`:
        also MiniCPM's and Gemma2's, models/minicpm.py and gemma2_lightweight.py)."""
        if getattr(hf_config, "attention_bias", False):
            raise UnsupportedCheckpoint("attention biases are not implemented")
        heads = hf_config.num_attention_heads
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=hf_config.num_key_value_heads or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            intermediate_size=hf_config.intermediate_size,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=_rope_theta(hf_config),
            **family,
        )


class LayerHeads:
    """A config with score heads after some of a decoder's layers (MiniCPM layerwise: each
    layer from `start_layer` on; gemma2-lightweight: each `layer_sep`-th): the sizes the
    engine reads, and the layers a score can be read after."""

    decoder: DecoderConfig
    start_layer: int
    layer_sep: int = 1

    @property
    def num_layers(self) -> int:
        return self.decoder.num_layers

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def layers(self) -> range:
        """The layers a score can be read after (FlagEmbedding's valid `cutoff_layers`)."""
        return range(self.start_layer, self.num_layers + 1, self.layer_sep)


@dataclass
class Stream:
    """One forward's token stream as every layer reads it: the rows of the shared prefixes
    (`prefixes`, computed once whatever the number of documents), then the rows of `batch`,
    then padding rows up to a multiple of `align` (zeros; attention never reads them)."""

    batch: PackedBatch
    prefixes: PackedBatch | None
    #: RoPE tables (rows, head_dim / 2) of every row
    cos: Tensor
    sin: Tensor
    #: the attention kernel (`Kernels.attention`)
    attend: Callable
    #: the per-token functions (`Kernels.compiled`)
    tokens: TokenFunctions
    align: int = 1

    @property
    def shared(self) -> int:
        """Rows of the shared prefixes, at the head of the stream."""
        return len(self.prefixes.input_ids) if self.prefixes is not None else 0

    @property
    def keep(self) -> int:
        """The first row the last layer computes: nothing reads the prefix rows after it,
        and from a row multiple on its GEMMs see the same row counts as the others'."""
        return self.shared - self.shared % self.align

    def spans(self, rows: int, device: torch.device) -> list[tuple[int, int]]:
        """The chunks of `rows` rows that each call of a per-token function takes."""
        return token_chunks(rows, self.tokens.chunk_for(device.type) or max(rows, 1), self.align)


# ---------------------------------------------------------------------------------------


class Decoder(nn.Module):
    #: compiled per-token functions exist (`compiled_tokens`): models/kernels.py's contract
    compiles = True

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.gemma_norm)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.kernels = Kernels()
        #: the per-token functions `kernels.compiled` names (compiled ones made on first use)
        self.tokens = EAGER_TOKENS
        self._compiled: TokenFunctions | None = None
        #: the token stream is padded to a multiple of this many rows (see `set_row_multiple`)
        self.row_multiple = 1

    def set_kernels(self, kernels: Kernels) -> None:
        """Run the engine's choice of kernels from the next forward on (models/kernels.py)."""
        refuse_unless(self, kernels)
        if kernels.compiled and self._compiled is None:
            self._compiled = compiled_tokens()
        self.tokens = self._compiled if kernels.compiled else EAGER_TOKENS
        self.kernels = kernels

    def set_row_multiple(self, rows: int) -> None:
        """Pad every token stream to a multiple of `rows` rows. oneDNN (prepacked bf16 and
        int8 linears on CPU) builds a GEMM primitive per new row count, ~1 ms per linear;
        with padding a few row counts recur and their primitives stay cached."""
        if rows < 1:
            raise ValueError(f"row multiple must be >= 1, got {rows}")
        self.row_multiple = rows

    @property
    def attention_shape(self) -> AttentionShape:
        """What the engine times candidate attention kernels on."""
        c = self.config
        return AttentionShape(c.num_heads, c.num_kv_heads, c.head_dim, causal=True)

    def embed(self, ids: Tensor) -> Tensor:
        x = self.embed_tokens(ids)
        if self.config.embed_scale != 1.0:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x

    def start(self, batch: PackedBatch) -> tuple[Tensor, Stream]:
        """The embedded rows (rows, hidden) of `batch`'s stream, and the stream.

        Shared prefixes ride in the same stream, ahead of the unshared tokens: each prefix
        token is computed once whatever the number of documents, and its projections and
        MLP share the documents' GEMMs instead of a second pass over every weight."""
        prefixes = self.prefix_stream(batch) if batch.prefixes else None
        ids, positions = batch.input_ids, batch.positions
        if prefixes is not None:
            ids = torch.cat((prefixes.input_ids, ids))
            positions = torch.cat((prefixes.positions, positions))
        # padding rows are zeros and stay zeros through every layer (no biases, zero
        # attention output), so they never move an int8 linear's activation scale
        padding = -len(ids) % self.row_multiple
        x = self.embed(ids)
        if padding:
            positions = F.pad(positions, (0, padding))
            x = F.pad(x, (0, 0, 0, padding))
        cos, sin = rotary(positions, self.inv_freq, self.embed_tokens.weight.dtype)
        attend = ATTENTION[self.kernels.attention]
        return x, Stream(batch, prefixes, cos, sin, attend, self.tokens, self.row_multiple)

    def forward(self, batch: PackedBatch, last_only: bool = False) -> Tensor:
        """Hidden states before the final norm: (T, hidden) of the unshared tokens, or with
        `last_only` (N, hidden) of each sequence's last token (`batch.last`), where the
        last layer computes nothing else (`Block.last_tokens`)."""
        x, stream = self.start(batch)
        for index, layer in enumerate(self.layers):
            if index < len(self.layers) - 1:
                x = layer(x, stream)
            elif last_only:
                return layer.last_tokens(x, stream)
            else:
                x = layer(x, stream, stream.keep)
        if last_only:  # no layers
            return x[stream.shared + batch.last]
        start = stream.shared - stream.keep
        return x[start : start + len(batch.input_ids)]

    def forward_rows(self, inputs: StaticInputs) -> Tensor:
        """Hidden states (rows, hidden) of a bucketed stream (ops/static_batch.py): every row
        computed, attention one varlen call per layer over prefixes, documents and padding.
        Nothing in it depends on the batch but the buffers' contents, so one captured CUDA
        graph of it serves every batch of its bucket (engine/cuda_graphs.py)."""
        batch = inputs.batch
        x = self.embed(batch.input_ids)
        cos, sin = rotary(batch.positions, self.inv_freq, self.embed_tokens.weight.dtype)
        attend = ATTENTION[self.kernels.attention]
        for layer in self.layers:
            x = layer.rows(x, cos, sin, attend, batch, self.tokens)
        return x

    def prefix_stream(self, batch: PackedBatch) -> PackedBatch:
        """The batch's shared prefixes as their own packed stream (positions from 0)."""
        lengths = batch.prefix_lengths
        ids = torch.cat(batch.prefixes)
        stream = PackedBatch(
            input_ids=ids,
            positions=torch.cat([torch.arange(n, device=ids.device) for n in lengths]),
            starts=batch.prefix_starts,
            lengths=lengths,
            last=torch.empty(0, dtype=torch.long, device=ids.device),
            prefix_of=[-1] * len(lengths),
            prefixes=[],
        )
        if batch.varlen is not None:
            stream.with_varlen_layout()
        return stream


class Block(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.gemma_norm)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, config.gemma_norm
        )
        self.mlp = MLP(config)

    def forward(self, x: Tensor, stream: Stream, keep_from: int = 0) -> Tensor:
        """x: the stream's rows (rows, hidden); returns rows `keep_from:` of the block's output.

        The per-token work (`project_tokens` before attention, `finish_tokens` after) runs in
        chunks (`Stream.spans`: on CPU cache-sized, on CUDA the whole stream); attention runs
        once over the whole stream (`Attention.forward`)."""
        q, k, v = self._project(x, stream)
        y = self.self_attn(q, k, v, stream, keep_from)
        x = x[keep_from:]
        spans = stream.spans(len(x), x.device)
        if len(spans) == 1:  # the outputs as they are, not copied (W-CPU bf16: +5 %)
            return stream.tokens.finish(self, x, y)
        out = torch.empty_like(x)
        for s, e in spans:
            out[s:e] = stream.tokens.finish(self, x[s:e], y[s:e])
        return out

    def last_tokens(self, x: Tensor, stream: Stream) -> Tensor:
        """The block's output (N, hidden) at each sequence's last token only: keys and values
        of every row, then attention, output projection and MLP for those N rows. A
        reranker's last layer reads nothing else (Qwen3-0.6B: 13/15 of that layer's GEMM
        work skipped)."""
        q, k, v = self._project(x, stream)
        rows = stream.batch.last + stream.shared
        attention = self.self_attn
        y = one_query_attention(
            q[rows], k, v, stream.batch, stream.shared, attention.config.scale
        ).view(len(rows), attention.q_size)
        n = len(rows)
        # as many rows as the stream's chunks have (a multiple of `align`, recurring GEMM
        # shapes) and never 1, on which a compiled function would specialize and recompile
        padding = max(-n % stream.align, 2 - n)
        x, y = F.pad(x[rows], (0, 0, 0, padding)), F.pad(y, (0, 0, 0, padding))
        return stream.tokens.finish(self, x, y)[:n]

    def rows(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attend: Callable,
        batch: PackedBatch,
        tokens: TokenFunctions,
    ) -> Tensor:
        """The block over all rows of a bucketed stream (`Decoder.forward_rows`): one call of
        each per-token function, one attention call over `batch`'s varlen layout."""
        q, k, v = tokens.project(self, x, cos, sin)
        y = attend(q, k, v, batch, None, True, self.self_attn.config.scale)
        return tokens.finish(self, x, y.reshape(len(x), self.self_attn.q_size))

    def _project(self, x: Tensor, stream: Stream) -> tuple[Tensor, Tensor, Tensor]:
        """`project_tokens` over the stream's rows, chunk by chunk."""
        project, cos, sin = stream.tokens.project, stream.cos, stream.sin
        spans = stream.spans(len(x), x.device)
        if len(spans) == 1:  # one chunk (most batches of compiled functions): no copies
            return project(self, x, cos, sin)
        c = self.self_attn.config
        q = x.new_empty(len(x), c.num_heads, c.head_dim)
        k = x.new_empty(len(x), c.num_kv_heads, c.head_dim)
        v = x.new_empty(len(x), c.num_kv_heads, c.head_dim)
        for s, e in spans:
            q[s:e], k[s:e], v[s:e] = project(self, x[s:e], cos[s:e], sin[s:e])
        return q, k, v


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        # fused q/k/v projection: one GEMM instead of three
        self.wqkv = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.wo = nn.Linear(self.q_size, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Fused q/k/v projection, q/k norms and RoPE of normed rows x (n, hidden):
        q (n, H, D), k and v (n, KVH, D)."""
        c, n = self.config, x.shape[0]
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(n, c.num_heads, c.head_dim)
        k = k.reshape(n, c.num_kv_heads, c.head_dim)
        v = v.reshape(n, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, stream: Stream, keep_from: int = 0
    ) -> Tensor:
        """Causal attention over the stream, once: the shared prefixes among themselves
        (unless the caller keeps none of their rows), every sequence of the batch over its
        prefix's keys and its own; padding rows get zeros. (rows - keep_from, H * D), before
        the output projection (`finish_tokens` applies it, fused with the residual)."""
        c, rows, shared = self.config, q.shape[0], stream.shared
        end = shared + len(stream.batch.input_ids)  # padding rows, if any, follow
        y = q.new_empty(rows, c.num_heads, c.head_dim)
        y[end:] = 0
        if shared and keep_from < shared:
            p = slice(None, shared)
            stream.attend(q[p], k[p], v[p], stream.prefixes, None, True, c.scale, out=y[p])
        prefix: PrefixKV | None = (k[:shared], v[:shared]) if shared else None
        u = slice(shared, end)
        stream.attend(q[u], k[u], v[u], stream.batch, prefix, True, c.scale, out=y[u])
        return y[keep_from:].view(rows - keep_from, self.q_size)


class MLP(nn.Module):
    #: the gate ‖ up projection, which `prepack_linears` may fuse with the activation
    GATED_LINEAR = "w13"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        self.w13 = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=False
        )  # gate ‖ up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.activation = config.activation
        self.act = F.silu if config.activation == "silu" else _gelu_tanh

    def gated(self, x: Tensor) -> Tensor:
        """act(x Wg) * (x Wu), (T, intermediate)."""
        if getattr(self.w13, "fuses_activation", False):  # prepacked or int8: act inside
            return self.w13(x)
        gate, up = self.w13(x).split(self.intermediate, dim=-1)
        return self.act(gate) * up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.gated(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.gemma = gemma
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.gemma:  # Gemma: normalize and scale by (1 + w) in float32, then cast
            h = F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps)
            return h.type_as(x)
        # Llama/Qwen: torch's fused kernel (statistics in float32); in float32 this is the
        # reference exactly, in bf16 it rounds once instead of twice (well inside tolerance)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class DecoderReranker(nn.Module):
    """Decoder + score head read at each sequence's last token: raw scores (N,) in float32.

    The head is (labels=1, hidden): for LM-head recipes the yes − no row difference (or the
    "Yes" row), for converted checkpoints their classifier. Final norm and head run on N
    rows only, never on every token nor on the vocabulary.
    """

    compiles = Decoder.compiles  # its kernels are the decoder's

    def __init__(
        self, decoder: Decoder, head_weight: Tensor, head_bias: Tensor | None = None
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.register_buffer("head_weight", head_weight.float(), persistent=False)  # (1, hidden)
        self.register_buffer(
            "head_bias", None if head_bias is None else head_bias.float(), persistent=False
        )

    def set_kernels(self, kernels: Kernels) -> None:
        self.decoder.set_kernels(kernels)

    @property
    def attention_shape(self) -> AttentionShape:
        return self.decoder.attention_shape

    def forward(self, batch: PackedBatch) -> Tensor:
        return self._score(self.decoder(batch, last_only=True))

    def forward_rows(self, inputs: StaticInputs) -> Tensor:
        """Raw scores (sequence slots,) of a bucketed stream, read at `inputs.last` (unused
        slots read row 0: the caller keeps the first N)."""
        return self._score(self.decoder.forward_rows(inputs)[inputs.last])

    def _score(self, hidden: Tensor) -> Tensor:
        """The score head on each sequence's last hidden state (N, hidden)."""
        h = self.decoder.norm(hidden).float()
        raw = h @ self.head_weight.T  # (N, hidden) x (hidden, 1) -> (N, 1)
        if self.head_bias is not None:
            raw = raw + self.head_bias
        return raw[:, 0]


# --- per-token functions ----------------------------------------------------------------

#: tokens per chunk of the eager per-token work (projections, norms, MLP): a chunk's
#: activations stay in the CPU's cache; eager passes over larger ones ran measurably slower
TOKEN_CHUNK = 1024
#: the same for compiled functions, whose fused loops touch each activation once: larger
#: chunks read each weight fewer times (W-CPU in-process on a 2-core Xeon: 4096 tokens
#: 6.1-6.8 docs/s, 1024 tokens 5.9-6.1)
COMPILED_TOKEN_CHUNK = 4096


def project_tokens(block: Block, x: Tensor, cos: Tensor, sin: Tensor):
    """Input norm, then `Attention.project`, for a chunk of tokens."""
    return block.self_attn.project(block.input_layernorm(x), cos, sin)


def finish_tokens(block: Block, x: Tensor, y: Tensor) -> Tensor:
    """Output projection, residual, post-attention norm and MLP for a chunk of tokens."""
    x = residual_linear(x, block.self_attn.wo, y)
    mlp = block.mlp
    return residual_linear(x, mlp.w2, mlp.gated(block.post_attention_layernorm(x)))


@dataclass(frozen=True)
class TokenFunctions:
    """The per-token functions a block calls: eager, or compiled by `compiled_tokens`."""

    project: Callable
    finish: Callable
    #: tokens per call of `project`/`finish` on CPU
    chunk: int = TOKEN_CHUNK

    def chunk_for(self, device_type: str) -> int | None:
        """Tokens per call on this device type; None: the whole stream in one call. The
        chunks are a CPU cache tuning; on CUDA each chunk costs ~30 kernel launches per
        layer (a 32k-token batch in 1,024-token chunks: ~22,000 launches on the 0.6B shape)
        and there is no cache to fit."""
        return self.chunk if device_type == "cpu" else None


EAGER_TOKENS = TokenFunctions(project_tokens, finish_tokens)


def compiled_tokens() -> TokenFunctions:
    """`torch.compile`d per-token functions: norms, RoPE, activations, int8 quantization and
    residuals fuse into a few loops around the GEMMs, which are custom ops inside the same
    graph (`onednn_ops`: one graph per function, no breaks). Shapes are dynamic (one
    compile serves every chunk length) and parameters are graph inputs, so all layers
    share one compiled graph. Inductor's cache is keyed by the CPU's vector ISA first
    (ops/compile_cache: entries of another ISA gave NaN)."""
    key_compile_cache_by_cpu_isa()
    return TokenFunctions(
        torch.compile(project_tokens, dynamic=True),
        torch.compile(finish_tokens, dynamic=True),
        COMPILED_TOKEN_CHUNK,
    )


def token_chunks(n: int, size: int = TOKEN_CHUNK, align: int = 1) -> list[tuple[int, int]]:
    """[start, end) spans of near-equal size, at most `size` tokens each (no 1-token
    tail: a compiled function would specialize on it and recompile mid-request). When `n`
    is a multiple of `align`, so is every span (then up to `size` rounded up to `align`): a
    padded stream's chunks keep recurring row counts."""
    units, unit = (n // align, align) if n % align == 0 else (n, 1)
    count = min(-(-n // size), units)  # never an empty span
    if count == 0:
        return []
    bounds = [unit * (units * i // count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


# --- helpers --------------------------------------------------------------------------------


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _rope_theta(hf_config: Any) -> float:
    """RoPE base from transformers 4 (`rope_theta`) or 5 (`rope_parameters`) configs; only
    the default RoPE type is implemented."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = (
        params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    )
    if rope_type != "default":
        raise UnsupportedCheckpoint(f"RoPE type {rope_type!r} is not implemented")
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise UnsupportedCheckpoint("config has no rope_theta")
    return float(theta)


def rope_inv_freq(config: DecoderConfig, device: torch.device | None = None) -> Tensor:
    exponents = (
        torch.arange(0, config.head_dim, 2, dtype=torch.float, device=device) / config.head_dim
    )
    return 1.0 / (config.rope_theta**exponents)


def rotary(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables (T, D/2) for the given positions, computed in float32 then cast (the
    HF tables repeat these for the second half of each head)."""
    freqs = positions[:, None].float() * inv_freq[None, :]  # (T, D/2)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (T, heads, D); rotate-half RoPE as in the HF Llama family,
    `x * cos + rotate_half(x) * sin`, written per half: the same roundings in every dtype
    (negation is exact), and compiled code fuses it into one pass instead of building the
    rotated copy of `x` first (int8 W-CPU: that kernel took ~10 % of a forward)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
