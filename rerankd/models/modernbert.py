"""A compact ModernBERT cross-encoder (`ModernBertForSequenceClassification`, one label) that
runs packed batches.

Config at the top, then Model → Block → Attention → MLP, the checkpoint mapping and the pure
helpers (rotary, local windows) at the bottom. The spec is transformers'
`modeling_modernbert.py`: pre-norm LayerNorms (bias per `norm_bias`; the first layer has no
attention norm), fused Wqkv, GeGLU MLP, RoPE with one theta for global and one for local
layers, every `global_attn_every_n_layers`-th layer global and the others local (each token
sees the tokens within `local_attention // 2` positions of its own sequence), final norm,
head (dense → act → norm) and classifier on the [CLS] token or the sequence mean.

Bidirectional attention means no prefix can be shared; packing still means no padding token
is ever computed. What this module does not do: tokenize (the cross-encoder recipe does),
or choose kernels (the engine calls `set_kernels` after checking them against SDPA). Its
per-token work runs eager only (`compiles`: no compiled functions).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rerankd.models.kernels import Kernels, refuse_unless
from rerankd.models.loader import UnsupportedCheckpoint
from rerankd.models.weights import Checkpoint
from rerankd.ops.attention import ATTENTION, PADDED_BUCKET_TOKENS, takes, torch_varlen_kernel
from rerankd.ops.attention_speed import AttentionShape
from rerankd.ops.batch import PackedBatch, upload
from rerankd.ops.prepack import residual_linear

#: transformers' ACT2FN names → the function they compute ("gelu" is the exact erf GELU)
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}
#: ModernBertConfig's defaults for configs that predate `rope_parameters` and omit a theta
_DEFAULT_THETA = {"full_attention": 160_000.0, "sliding_attention": 10_000.0}


@dataclass
class ModernBertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    classifier_bias: bool
    hidden_act: str
    classifier_act: str
    global_rope_theta: float
    local_rope_theta: float
    #: per layer: True for global (full) attention, False for local (sliding window)
    global_layers: tuple[bool, ...]
    #: a local layer's token sees keys at most this many positions away (local_attention // 2)
    window: int
    #: "cls" (first token) or "mean" (over the sequence's tokens)
    pooling: str = "cls"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf: Any) -> ModernBertConfig:
        if hf.model_type != "modernbert":
            raise UnsupportedCheckpoint(f"no packed ModernBERT for model_type {hf.model_type!r}")
        acts = (hf.hidden_activation, getattr(hf, "classifier_activation", "gelu"))
        for act in acts:
            if act not in ACTIVATIONS:
                raise UnsupportedCheckpoint(f"ModernBERT activation {act!r} is not implemented")
        pooling = getattr(hf, "classifier_pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise UnsupportedCheckpoint(f"classifier_pooling {pooling!r} is not implemented")
        layers = hf.num_hidden_layers
        types = getattr(hf, "layer_types", None)
        if types is None:  # transformers 4 configs: an int pattern
            every = getattr(hf, "global_attn_every_n_layers", 3)
            types = ["sliding_attention" if i % every else "full_attention" for i in range(layers)]
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=layers,
            num_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            norm_eps=hf.norm_eps,
            norm_bias=bool(hf.norm_bias),
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            classifier_bias=bool(getattr(hf, "classifier_bias", False)),
            hidden_act=acts[0],
            classifier_act=acts[1],
            global_rope_theta=_theta(hf, "full_attention", "global_rope_theta"),
            local_rope_theta=_theta(hf, "sliding_attention", "local_rope_theta"),
            global_layers=tuple(t == "full_attention" for t in types),
            window=hf.local_attention // 2,
            pooling=pooling,
        )


def _theta(hf: Any, layer_type: str, legacy: str) -> float:
    """RoPE base of one layer type from transformers 5 (`rope_parameters[type]`) or 4
    (`global_rope_theta`/`local_rope_theta`) configs; only the default RoPE is implemented."""
    params = (getattr(hf, "rope_parameters", None) or {}).get(layer_type) or {}
    if params.get("rope_type", "default") != "default":
        raise UnsupportedCheckpoint(f"RoPE type {params['rope_type']!r} is not implemented")
    theta = params.get("rope_theta") or getattr(hf, legacy, None)
    return float(theta or _DEFAULT_THETA[layer_type])


# ---------------------------------------------------------------------------------------


class ModernBert(nn.Module):
    """Embeddings + layers + head → raw scores (N,) in float32."""

    #: no compiled per-token functions: eager only (models/kernels.py's contract)
    compiles = False

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        c = self.config = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_norm = _norm(c)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self.final_norm = _norm(c)
        self.head_dense = nn.Linear(c.hidden_size, c.hidden_size, bias=c.classifier_bias)
        self.head_norm = _norm(c)
        self.classifier = nn.Linear(c.hidden_size, 1)
        self.head_act = ACTIVATIONS[c.classifier_act]
        self.register_buffer("global_inv_freq", inv_freq(c.global_rope_theta, c), persistent=False)
        self.register_buffer("local_inv_freq", inv_freq(c.local_rope_theta, c), persistent=False)

    def set_kernels(self, kernels: Kernels) -> None:
        """Run the engine's choice of kernels (models/kernels.py; eager only): global layers
        take its attention kernel (`sdpa`, `amx`, `varlen`, …), local layers the windowed
        form of it (`local_attention`)."""
        refuse_unless(self, kernels)
        backend = kernels.attention
        for layer in self.layers:
            attention = layer.attention
            attention.attend = (
                ATTENTION[backend] if attention.is_global else local_attention(backend)
            )

    @property
    def attention_shape(self) -> AttentionShape:
        """What the engine times candidate attention kernels on (the global layers' form)."""
        c = self.config
        return AttentionShape(c.num_heads, c.num_heads, c.head_dim, causal=False)

    def forward(self, batch: PackedBatch) -> Tensor:
        c = self.config
        x = self.embed_norm(self.tok_embeddings(batch.input_ids))  # (T, hidden)
        rope = {
            True: rotary(batch.positions, self.global_inv_freq, x.dtype),
            False: rotary(batch.positions, self.local_inv_freq, x.dtype),
        }  # is_global → (cos, sin), each (T, head_dim / 2)
        for layer in self.layers:
            x = layer(x, batch, rope[layer.attention.is_global])
        if c.pooling == "cls":
            pooled = self.final_norm(x[batch.first])  # (N, h): [CLS]
        else:
            pooled = mean_rows(self.final_norm(x), batch)
        pooled = self.head_norm(self.head_act(self.head_dense(pooled)))
        return self.classifier(pooled)[:, 0].float()


class Block(nn.Module):
    """Pre-norm layer; layer 0 has no attention norm (its input is the normed embedding)."""

    def __init__(self, config: ModernBertConfig, index: int) -> None:
        super().__init__()
        self.attention_norm = nn.Identity() if index == 0 else _norm(config)
        self.attention = Attention(config, config.global_layers[index])
        self.mlp_norm = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, batch: PackedBatch, rope: tuple[Tensor, Tensor]) -> Tensor:
        y = self.attention(self.attention_norm(x), batch, rope)  # (T, hidden), before wo
        x = residual_linear(x, self.attention.wo, y)
        return residual_linear(x, self.mlp.wo, self.mlp.gated(self.mlp_norm(x)))


class Attention(nn.Module):
    def __init__(self, config: ModernBertConfig, is_global: bool) -> None:
        super().__init__()
        self.config = config
        self.is_global = is_global
        h, bias = config.hidden_size, config.attention_bias
        self.wqkv = nn.Linear(h, 3 * h, bias=bias)  # fused q ‖ k ‖ v
        self.wo = nn.Linear(h, h, bias=bias)
        self.attend = ATTENTION["sdpa"] if is_global else local_attention("sdpa")

    def forward(self, x: Tensor, batch: PackedBatch, rope: tuple[Tensor, Tensor]) -> Tensor:
        """(T, hidden) → attention output (T, hidden) before `wo` (the block applies it)."""
        c = self.config
        seqlen = x.shape[0]
        qkv = self.wqkv(x).view(seqlen, 3, c.num_heads, c.head_dim)
        q, k = apply_rotary(qkv[:, :2], *rope).unbind(dim=1)  # (T, H, D) each, rows strided
        v = qkv[:, 2]
        scale = c.head_dim**-0.5
        if self.is_global:
            y = self.attend(q, k, v, batch, None, causal=False, scale=scale)
        else:
            y = self.attend(q, k, v, batch, c.window, scale)
        return y.reshape(seqlen, c.hidden_size)


#: the config's activation by its name in the GEMM epilogues (ops/prepack.py), for those
#: oneDNN applies
_EPILOGUE_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}


class MLP(nn.Module):
    """GeGLU: wi → (input ‖ gate) → act(input) · gate → wo (`wo` applied by the block)."""

    #: the input ‖ gate projection: prepacked (or int8) with `activation` in its epilogue,
    #: it computes act(input) · gate itself (`fuses_activation`), not a (T, 2 · inter) output
    #: split by a separate activation and product pass
    GATED_LINEAR = "wi"

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        h, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.wi = nn.Linear(h, 2 * inter, bias=bias)
        self.wo = nn.Linear(inter, h, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]
        self.activation = _EPILOGUE_ACTIVATIONS.get(config.hidden_act)

    def gated(self, x: Tensor) -> Tensor:
        """act(input) · gate, (T, inter): the MLP before `wo` (the block fuses `wo` with
        the residual add)."""
        if getattr(self.wi, "fuses_activation", False):  # prepacked or int8: act inside
            return self.wi(x)
        input, gate = self.wi(x).chunk(2, dim=-1)  # (T, inter) each
        return self.act(input).mul_(gate)


def _norm(config: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


# --- checkpoint mapping -----------------------------------------------------------------------

#: our parameter name prefix → transformers' (ModernBertForSequenceClassification)
_HF_NAMES = {
    "tok_embeddings.": "model.embeddings.tok_embeddings.",
    "embed_norm.": "model.embeddings.norm.",
    "final_norm.": "model.final_norm.",
    "head_dense.": "head.dense.",
    "head_norm.": "head.norm.",
    "classifier.": "classifier.",
}
_HF_LAYER_NAMES = {
    "attention_norm.": "attn_norm.",
    "attention.wqkv.": "attn.Wqkv.",
    "attention.wo.": "attn.Wo.",
    "mlp_norm.": "mlp_norm.",
    "mlp.wi.": "mlp.Wi.",
    "mlp.wo.": "mlp.Wo.",
}


def hf_name(name: str) -> str:
    """`layers.3.attention.wqkv.weight` → `model.layers.3.attn.Wqkv.weight`."""
    if name.startswith("layers."):
        index, rest = name.removeprefix("layers.").split(".", 1)
        for ours, theirs in _HF_LAYER_NAMES.items():
            if rest.startswith(ours):
                return f"model.layers.{index}.{theirs}{rest.removeprefix(ours)}"
    for ours, theirs in _HF_NAMES.items():
        if name.startswith(ours):
            return theirs + name.removeprefix(ours)
    raise KeyError(f"no checkpoint name for {name!r} (this is a bug)")


def load_modernbert(
    checkpoint: Checkpoint, config: ModernBertConfig, dtype: torch.dtype, device: torch.device
) -> ModernBert:
    """Map a ModernBertForSequenceClassification checkpoint onto `ModernBert`."""
    with torch.device("meta"):
        model = ModernBert(config)
    state = {
        name: checkpoint.get(hf_name(name)).to(device=device, dtype=dtype)
        for name in model.state_dict()
    }
    if state["classifier.weight"].shape[0] != 1:
        raise UnsupportedCheckpoint("only one-label classification heads are rerankers")
    model.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers stay on meta after assign: rebuild them on the device
    model.global_inv_freq = inv_freq(config.global_rope_theta, config).to(device)
    model.local_inv_freq = inv_freq(config.local_rope_theta, config).to(device)
    return model.eval()


# --- helpers: rotary, pooling, local windows --------------------------------------------------


def inv_freq(theta: float, config: ModernBertConfig) -> Tensor:
    """(head_dim / 2,) float32 RoPE frequencies, on the current default device."""
    dim = config.head_dim
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def rotary(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (T, head_dim / 2), computed in float32 and cast to `dtype` as
    transformers does (its (T, head_dim) tables repeat these halves: cat(freqs, freqs))."""
    freqs = positions[:, None].float() * inv_freq[None, :]  # (T, D/2)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (T, n, H, D) (q ‖ k) → rotated, contiguous, in x's dtype: the rotate-half form
    x·cos + rotate_half(x)·sin written per half (x1·c − x2·s, x2·c + x1·s) in four passes
    over half-size tensors; transformers upcasts to float32, concatenates and negates first
    (same math; in bf16 each pass rounds, within bf16's tolerance)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, None, :], sin[:, None, None, :]  # (T, 1, 1, D/2)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=o2).addcmul_(x1, s)
    return out


def mean_rows(x: Tensor, batch: PackedBatch) -> Tensor:
    """(T, h) → (N, h): each sequence's mean, summed in float32, returned in x's dtype."""
    cache = batch.__dict__.setdefault("_mean_rows", {})
    if "index" not in cache:
        lengths = batch.counts  # on the device already: no host sync
        cache["index"] = torch.arange(len(lengths), device=x.device).repeat_interleave(
            lengths,
            output_size=sum(batch.lengths),  # the size given: no sync to learn it
        )
        cache["lengths"] = lengths[:, None].float()
    sums = x.new_zeros(batch.num_sequences, x.shape[1], dtype=torch.float32)
    sums.index_add_(0, cache["index"], x.float())
    return (sums / cache["lengths"]).to(x.dtype)


#: local attention: (q, k, v, batch, window, scale) → (T, H, D)
LocalAttention = Callable[[Tensor, Tensor, Tensor, PackedBatch, int, float], Tensor]


def local_attention(backend: str) -> LocalAttention:
    """The windowed kernel that goes with a global `backend`: torch's varlen kernel with
    `window_size` where the engine runs `varlen` or `flash_gqa` and this torch's kernel takes
    it (CUDA), else SDPA with a band mask (`band_sdpa_attention`; the AMX kernel and the
    other CUDA backends have no window) — except for a batch whose sequences all fit in one
    window, which the global kernel attends exactly (short documents: rerankd's AMX kernel
    instead of SDPA in every layer)."""
    kernel = torch_varlen_kernel()
    # flash_gqa's op is varlen_attn's; ModernBERT has no GQA, so its window goes through
    # varlen_attn itself
    windowed = backend in ("varlen", "flash_gqa")
    if windowed and kernel is not None and takes(kernel, "window_size"):
        return functools.partial(windowed_varlen_attention, kernel=kernel)
    if backend == "sdpa":  # the band path is SDPA too, one call per bucket
        return band_sdpa_attention
    return functools.partial(_short_or_band, attend=ATTENTION[backend])


def _short_or_band(q, k, v, batch: PackedBatch, window: int, scale: float, attend) -> Tensor:
    if max(batch.lengths) <= window + 1:  # every pair within the window: full attention
        return attend(q, k, v, batch, None, causal=False, scale=scale)
    return band_sdpa_attention(q, k, v, batch, window, scale)


#: a local layer attends a sequence longer than this (or 4 windows) in query chunks, each
#: with the keys from a window before it to a window after it (at most this many): linear
#: cost in the length instead of quadratic (an 8192-token document: 1/16 of the scores)
CHUNK_SPAN = 512


def band_sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, batch: PackedBatch, window: int, scale: float
) -> Tensor:
    """q/k/v: (T, H, D) → (T, H, D); query i of a sequence sees its keys j with
    |i − j| ≤ window. Sequences up to `CHUNK_SPAN` tokens: one SDPA call per bucket of them
    padded to a rectangle (`_band_buckets`): per-sequence calls cost 3x more per layer on the
    W-CPU batches (SDPA's CPU kernel pays its setup per call; transformers' padded call per
    layer beat them). Longer ones: per sequence, in query chunks."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    span = max(CHUNK_SPAN, 4 * window)
    chunk = span - 2 * window  # queries per chunk: their keys fit in `span`
    for rows, real, targets, mask in _band_buckets(batch, span, window, q.dtype):
        bsz, width = mask.shape[0], mask.shape[-1]
        # (B·L, H, D) gathered -> (B, H, L, D)
        qb, kb, vb = (
            t.index_select(0, rows).unflatten(0, (bsz, width)).transpose(1, 2) for t in (q, k, v)
        )
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        out[targets] = ob.transpose(1, 2).flatten(0, 1).index_select(0, real)
    for start, length in zip(batch.starts, batch.lengths, strict=True):
        if length <= span:
            continue
        band = band_mask(batch, span, window, q.dtype)
        for a in range(0, length, chunk):
            b = min(a + chunk, length)
            ks, ke = max(0, a - window), min(length, b + window)
            mask = band[a - ks : b - ks, : ke - ks]  # Toeplitz: the band shifted by a - ks
            _attend(q, k, v, out, (start + a, start + b), (start + ks, start + ke), mask, scale)
    return out


def _band_buckets(batch: PackedBatch, span: int, window: int, dtype: torch.dtype) -> list:
    """The sequences of at most `span` tokens, longest first, in buckets of at most
    `PADDED_BUCKET_TOKENS` padded tokens. Per bucket: rows (B·L,) into the stream (padding
    repeats the sequence's first row), the indices of the real ones among them and their
    rows in the stream (where their outputs go), and an additive mask (B, 1, L, L)
    that shows query i key j when j is real and |i − j| ≤ window (padded queries see the real
    keys: no empty row, no NaN; their outputs are dropped). Cached on the batch for every
    local layer. The index lists are made here on the host and sent in one pinned copy
    (`upload`): finding the real rows on the device (`nonzero`) would be a host sync."""
    cache = batch.__dict__.setdefault("_band_buckets", {})
    key = (span, window, dtype)
    if key in cache:
        return cache[key]
    device = batch.input_ids.device
    order = sorted(
        (i for i, n in enumerate(batch.lengths) if n <= span), key=lambda i: -batch.lengths[i]
    )
    groups: list[list[int]] = []
    for i in order:  # the first of a group is its longest
        if groups and (len(groups[-1]) + 1) * batch.lengths[groups[-1][0]] <= PADDED_BUCKET_TOKENS:
            groups[-1].append(i)
        else:
            groups.append([i])
    parts: list[list[int]] = []  # per group: lengths, rows, real, targets (host → one copy)
    for group in groups:
        width = batch.lengths[group[0]]
        rows, real, targets = [], [], []
        for b, i in enumerate(group):
            start, n = batch.starts[i], batch.lengths[i]
            rows += [*range(start, start + n), *[start] * (width - n)]
            real += range(b * width, b * width + n)
            targets += range(start, start + n)
        parts += [[batch.lengths[i] for i in group], rows, real, targets]
    tensors = iter(upload(parts, device))
    buckets = []
    for group in groups:
        lengths, rows, flat_real, targets = (next(tensors) for _ in range(4))
        index = torch.arange(batch.lengths[group[0]], device=device)
        real = index[None, :] < lengths[:, None]  # (B, L)
        near = (index[:, None] - index[None, :]).abs() <= window  # (L, L)
        visible = real[:, None, :] & (near[None] | ~real[:, :, None])  # (B, L, L)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        mask.masked_fill_(~visible, float("-inf"))
        buckets.append((rows, flat_real, targets, mask[:, None]))
    cache[key] = buckets
    return buckets


def _attend(q, k, v, out, rows: tuple[int, int], keys: tuple[int, int], mask, scale) -> None:
    """out[rows] = SDPA(q[rows], k[keys], v[keys]) with an additive mask or none."""
    # (1, H, L, D): SDPA's fused kernels need 4-D inputs
    qi = q[rows[0] : rows[1]].transpose(0, 1)[None]
    ki, vi = (t[keys[0] : keys[1]].transpose(0, 1)[None] for t in (k, v))
    oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
    out[rows[0] : rows[1]] = oi[0].transpose(0, 1)  # (H, L, D) -> (L, H, D)


def band_mask(batch: PackedBatch, size: int, window: int, dtype: torch.dtype) -> Tensor:
    """(size, size) additive mask in `dtype`: 0 where |i − j| ≤ window, −inf elsewhere.
    Additive because SDPA's CPU kernel turns a bool mask into one on every call. A Toeplitz
    band: any (n, m) block whose diagonal offset is d is `band[d : d + n, :m]`. Cached on the
    batch, built once for every local layer."""
    cache = batch.__dict__.setdefault("_band_masks", {})
    key = (size, window, dtype)
    if key not in cache:
        index = torch.arange(size, device=batch.input_ids.device)
        outside = (index[:, None] - index[None, :]).abs() > window
        mask = torch.zeros(outside.shape, dtype=dtype, device=outside.device)
        cache[key] = mask.masked_fill_(outside, float("-inf"))
    return cache[key]


def windowed_varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    batch: PackedBatch,
    window: int,
    scale: float,
    kernel: Callable | None = None,
) -> Tensor:
    """Same contract as `band_sdpa_attention`, as one varlen kernel call over the packed
    stream: `window_size=(window, window)` is flash-attention's inclusive band."""
    layout = batch.varlen if batch.varlen is not None else batch.with_varlen_layout().varlen
    kernel = kernel or torch_varlen_kernel()
    return kernel(
        q,
        k,
        v,
        layout.cu_seq_q,
        layout.cu_seq_k,
        layout.max_q,
        layout.max_k,
        scale=scale,
        window_size=(window, window),
    )
