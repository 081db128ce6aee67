"""Gemma2 with token compression and per-layer score heads (bge-reranker-v2.5-gemma2-lightweight).

The checkpoint's `CostWiseGemmaForCausalLM` (FlagEmbedding's models/gemma_model.py, also shipped
as the checkpoint's remote code, which rerankd never runs) is Gemma2 (transformers 4.46's
`Gemma2DecoderLayer`) with a loop of its own around the layers. Per sequence, rerankd computes
what that loop computes:

- embeddings × sqrt(hidden) (the factor cast to the activations' dtype first, as Gemma does);
- Gemma2 blocks: pre and post norms around attention and around the MLP (four (1 + w)
  RMSNorms per block), GELU-tanh gated MLP, RoPE, grouped-query attention scaled by
  `query_pre_attn_scalar ** -0.5` (not head_dim), causal, and on even layers (0, 2, …) a
  sliding window of `sliding_window` keys (the token itself and the window − 1 before it);
- no attention-logit soft-capping: FlagEmbedding loads the model with transformers' default
  attention, which for this class is SDPA, and 4.46's `Gemma2SdpaAttention` ignores
  `attn_logit_softcapping` (the recorded reference confirms it; eager attention, which caps,
  gives other scores);
- before layer `idx` runs (so after `idx` layers), in this order: if `idx` is a scoring layer,
  the final norm of the last token goes through a head, and the sequence is done; then, if
  `idx` is a compression layer (never 0), the passage's hidden states are mean-pooled in
  consecutive groups of `compress_ratio` tokens (the last group may be shorter) and the
  sequence becomes query + pooled passage + prompt, positions renumbered 0..n'-1 (RoPE and the
  sliding window then count compressed tokens). A second compression layer pools the pooled
  passage again. A scoring layer equal to a compression layer reads the uncompressed state;
- the score is ``softcap(head · norm(h_last))`` with Gemma2's `final_logit_softcapping`
  (tanh(s / 30) · 30), the head being `lm_head[k]` where k is the *rank* of the scoring layer
  among the cutoff layers the caller listed, not the layer's own head (the reference's
  quirk: `cutoff_layers=[28]` is scored by the head after `start_layer`, `lm_head[0]`).

The model knows nothing about prompts: each sequence comes with a `Plan` (its query and prompt
lengths, scoring layer, head and compression), which the engine builds from the recipe's
pairs. Sequences run as one flat token stream (no padding); projections and MLPs share the
GEMMs; attention runs as one SDPA call per bucket of similar-length sequences padded to a
rectangle (`ops.attention.length_buckets`, masks built once per stream layout). A sequence
leaves the stream once scored: no layer past the deepest scoring layer runs, and nothing
after a sequence's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rerankd.models.decoder import (
    MLP,
    DecoderConfig,
    LayerHeads,
    RMSNorm,
    apply_rotary,
    rope_inv_freq,
    rotary,
)
from rerankd.models.kernels import Kernels, refuse_unless
from rerankd.models.loader import UnsupportedCheckpoint
from rerankd.models.weights import Checkpoint
from rerankd.ops.attention import length_buckets


@dataclass
class LightweightConfig(LayerHeads):
    #: the Gemma2 decoder's shape (`gemma_norm`, GELU-tanh, embeddings × sqrt(hidden))
    decoder: DecoderConfig
    query_pre_attn_scalar: float
    #: keys a token of an even layer sees, itself included (None: every layer global)
    sliding_window: int | None
    final_logit_softcapping: float | None
    #: heads exist after layers start_layer, start_layer + layer_sep, … num_layers
    start_layer: int
    layer_sep: int = 1

    @property
    def scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> LightweightConfig:
        if not getattr(hf_config, "layer_wise", False):  # a vocabulary head gives no score
            raise UnsupportedCheckpoint("CostWiseGemma without layer_wise heads")
        act = getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise UnsupportedCheckpoint(f"Gemma2 activation {act!r} is not implemented")
        decoder = DecoderConfig.llama_like(
            hf_config,
            gemma_norm=True,
            embed_scale=math.sqrt(hf_config.hidden_size),
            activation="gelu_tanh",
        )
        start = int(getattr(hf_config, "start_layer", 28))  # CostWiseGemmaConfig's defaults
        sep = int(getattr(hf_config, "layer_sep", 28))
        if not 0 <= start <= decoder.num_layers or sep < 1:
            raise UnsupportedCheckpoint(f"start_layer {start}, layer_sep {sep}")
        window = getattr(hf_config, "sliding_window", None)
        cap = getattr(hf_config, "final_logit_softcapping", None)
        return cls(
            decoder=decoder,
            query_pre_attn_scalar=float(getattr(hf_config, "query_pre_attn_scalar", 256)),
            sliding_window=int(window) if window else None,
            final_logit_softcapping=float(cap) if cap else None,
            start_layer=start,
            layer_sep=sep,
        )


@dataclass(frozen=True)
class Plan:
    """How one sequence runs: its layout and what the caller asked of it.

    `query_length`: bos + query + separator tokens; `prompt_length`: separator + prompt
    tokens at the end (the passage lies between). `layer`: scored after this many layers,
    by head `head`. `compress_layers`: before which layers its passage is pooled by
    `compress_ratio` (ratio 1: never)."""

    query_length: int
    prompt_length: int
    layer: int
    head: int = 0
    compress_ratio: int = 1
    compress_layers: frozenset[int] = frozenset()

    def compresses_at(self, idx: int) -> bool:
        return self.compress_ratio > 1 and idx != 0 and idx in self.compress_layers


# ---------------------------------------------------------------------------------------


class LightweightReranker(nn.Module):
    """Gemma2 + per-layer heads: raw scores (N,) in float32, each as its `Plan` asks."""

    #: no compiled per-token functions: eager only (models/kernels.py's contract)
    compiles = False

    def __init__(self, config: LightweightConfig) -> None:
        super().__init__()
        c = config.decoder
        self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, gemma=True)
        self.register_buffer("inv_freq", rope_inv_freq(c), persistent=False)
        heads = torch.zeros(len(config.layers), c.hidden_size)
        self.register_buffer("heads", heads, persistent=False)  # (H, hidden), float32

    def set_kernels(self, kernels: Kernels) -> None:
        """The engine's choice of kernels (models/kernels.py): bucketed SDPA with
        sliding-window masks and eager per-token work is all this model runs, so any other
        choice is refused (ValueError)."""
        refuse_unless(self, kernels, attention=("sdpa",))

    def forward(self, ids: Tensor, lengths: Sequence[int], plans: Sequence[Plan]) -> Tensor:
        """ids: (T,) the sequences' tokens back to back; lengths[i] and plans[i] for each."""
        c = self.config
        if any(p.layer not in c.layers or not 0 <= p.head < len(c.layers) for p in plans):
            raise ValueError(f"plans {sorted({(p.layer, p.head) for p in plans})}; this is a bug")
        x = self.embed_tokens(ids)
        x = x * torch.tensor(c.decoder.embed_scale, dtype=x.dtype)  # Gemma: the factor in dtype
        scores = torch.empty(len(plans), dtype=torch.float32, device=x.device)
        alive = list(range(len(plans)))  # sequences in the stream, in stream order
        lengths = list(lengths)
        deepest = max((p.layer for p in plans), default=0)
        positions = None
        for idx in range(deepest + 1):
            done = [i for i, s in enumerate(alive) if plans[s].layer == idx]
            if done:
                self._score(x, lengths, [alive[i] for i in done], done, plans, scores)
                x, lengths = _drop(x, lengths, done)
                gone = set(done)
                alive = [s for i, s in enumerate(alive) if i not in gone]
                positions = None
            if not alive:
                break
            squeeze = [i for i, s in enumerate(alive) if plans[s].compresses_at(idx)]
            if squeeze:
                x, lengths = _compress(x, lengths, squeeze, [plans[alive[i]] for i in squeeze])
                positions = None
            if positions is None:  # the stream changed: renumber, new RoPE tables and masks
                positions = torch.cat([torch.arange(n, device=x.device) for n in lengths])
                cos, sin = rotary(positions, self.inv_freq, x.dtype)
                layout = Layout.of(lengths, c.sliding_window, x.device)
            x = self.layers[idx](x, cos, sin, layout)
        return scores

    def _score(self, x, lengths, which, rows, plans, out) -> None:
        """Scores of sequences `which` (at stream indices `rows`): softcap(head · norm(h_last))."""
        ends = torch.tensor(lengths, device=x.device).cumsum(0) - 1  # last token of each
        h = self.norm(x[ends[rows]]).float()  # (n, hidden)
        heads = self.heads[torch.tensor([plans[s].head for s in which], device=x.device)]
        raw = (h * heads).sum(-1)  # (n, hidden) . (n, hidden) -> (n,)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            raw = torch.tanh(raw / cap) * cap
        out[torch.tensor(which, device=x.device)] = raw


class Block(nn.Module):
    """Gemma2's decoder layer: x + post(attn(pre(x))), then x + post_ff(mlp(pre_ff(x)))."""

    def __init__(self, config: LightweightConfig, index: int) -> None:
        super().__init__()
        c = config.decoder
        norm = lambda: RMSNorm(c.hidden_size, c.rms_norm_eps, gemma=True)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(config, sliding=index % 2 == 0)  # Gemma2: even layers
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = MLP(c)
        self.post_feedforward_layernorm = norm()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layout: Layout) -> Tensor:
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, layout)
        )
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Attention(nn.Module):
    def __init__(self, config: LightweightConfig, sliding: bool) -> None:
        super().__init__()
        c = config.decoder
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.wqkv = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.wo = nn.Linear(self.q_size, c.hidden_size, bias=False)
        self.scale = config.scale
        self.sliding = sliding

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layout: Layout) -> Tensor:
        T = x.shape[0]
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(T, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(T, self.kv_heads, self.head_dim), cos, sin)
        v = v.view(T, self.kv_heads, self.head_dim)
        # row T: a zero row that padding positions gather
        q, k, v = (torch.cat((t, t.new_zeros(1, *t.shape[1:]))) for t in (q, k, v))
        y = x.new_empty(T, self.heads, self.head_dim)
        masks = layout.sliding if self.sliding else layout.causal
        for rows, mask, real in zip(layout.rows, masks, layout.real, strict=True):
            # (B, H, L, D) x (B, KVH, L, D) -> (B, H, L, D)
            out = F.scaled_dot_product_attention(
                q[rows].transpose(1, 2),
                k[rows].transpose(1, 2),
                v[rows].transpose(1, 2),
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=self.heads != self.kv_heads,
            ).transpose(1, 2)  # (B, L, H, D)
            y[rows[real]] = out[real]
        return self.wo(y.reshape(T, self.q_size))


# --- loading --------------------------------------------------------------------------------


def load_lightweight(
    checkpoint: Checkpoint, config: LightweightConfig, dtype: torch.dtype, device: torch.device
) -> LightweightReranker:
    """The checkpoint's Gemma2 (``model.*``; q/k/v and gate/up fused) and its heads stacked
    (H, hidden) in float32."""

    def get(name: str) -> Tensor:
        return checkpoint.get(name).to(device=device, dtype=dtype)

    state = {"embed_tokens.weight": get("model.embed_tokens.weight")}
    state["norm.weight"] = get("model.norm.weight")
    for i in range(config.num_layers):
        p, ours = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        qkv = [get(attn + f"{n}_proj.weight") for n in "qkv"]
        state[ours + "self_attn.wqkv.weight"] = torch.cat(qkv)
        state[ours + "self_attn.wo.weight"] = get(attn + "o_proj.weight")
        state[ours + "mlp.w13.weight"] = torch.cat(
            [get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")]
        )
        state[ours + "mlp.w2.weight"] = get(mlp + "down_proj.weight")
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            state[ours + f"{norm}_layernorm.weight"] = get(p + f"{norm}_layernorm.weight")
    names = [f"lm_head.{k}.linear_head.weight" for k in range(len(config.layers))]
    heads = torch.cat([checkpoint.get(name).float() for name in names])  # (H, hidden)
    if heads.shape != (len(names), config.decoder.hidden_size):
        raise UnsupportedCheckpoint(f"score heads of shape {tuple(heads.shape)}")
    with torch.device("meta"):
        model = LightweightReranker(config)
    model.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers: rebuilt off the meta device
    model.inv_freq = rope_inv_freq(config.decoder, device)
    model.heads = heads.to(device)
    return model.eval()


# --- helpers --------------------------------------------------------------------------------


@dataclass
class Layout:
    """Attention over a stream of sequences, as buckets of similar lengths padded to (B, L):
    `rows[b]` (B, L) the stream rows of each bucket (padding: row T, a zero row), `real[b]`
    which are real, and the (B, 1, L, L) masks of global (`causal`) and sliding layers."""

    rows: list[Tensor]
    real: list[Tensor]
    causal: list[Tensor]
    sliding: list[Tensor]

    @classmethod
    def of(cls, lengths: Sequence[int], window: int | None, device: torch.device) -> Layout:
        total = sum(lengths)
        starts = [0, *torch.tensor(list(lengths)).cumsum(0).tolist()]
        layout = cls([], [], [], [])
        for bucket in length_buckets(list(lengths)):
            L = max(lengths[s] for s in bucket)
            i = torch.arange(L)[:, None]
            j = torch.arange(L)[None, :]
            causal = j <= i
            # transformers 4.46's Gemma2 sliding mask: keys j <= i - window masked
            sliding = causal & (j > i - window) if window is not None else causal
            rows = torch.full((len(bucket), L), total, dtype=torch.long)
            masks = torch.zeros(2, len(bucket), 1, L, L, dtype=torch.bool)
            for b, s in enumerate(bucket):
                n = lengths[s]
                rows[b, :n] = torch.arange(starts[s], starts[s] + n)
                keys = j < n
                masks[0, b, 0] = causal & keys
                masks[1, b, 0] = sliding & keys
                masks[:, b, 0, n:, :n] = True  # padding queries see real keys: no empty row
            layout.rows.append(rows.to(device))
            layout.real.append(layout.rows[-1] < total)
            layout.causal.append(masks[0].to(device))
            layout.sliding.append(masks[1].to(device))
        return layout


def _drop(x: Tensor, lengths: list[int], rows: list[int]) -> tuple[Tensor, list[int]]:
    """The stream without sequences `rows` (stream indices)."""
    gone = set(rows)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    keep = [i for i in range(len(lengths)) if i not in gone]
    if not keep:
        return x[:0], []
    return torch.cat([x[starts[i] : starts[i + 1]] for i in keep]), [lengths[i] for i in keep]


def _compress(
    x: Tensor, lengths: list[int], rows: list[int], plans: list[Plan]
) -> tuple[Tensor, list[int]]:
    """The stream with the passages of sequences `rows` pooled (FlagEmbedding's
    `token_compress`, per sequence): query tokens kept, passage tokens averaged in consecutive
    groups of `compress_ratio` (a shorter last group averages what it has), prompt kept."""
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    by_row = dict(zip(rows, plans, strict=True))
    pieces, new_lengths = [], []
    for i in range(len(lengths)):
        h = x[starts[i] : starts[i + 1]]
        plan = by_row.get(i)
        if plan is not None:
            h = _pool_passage(h, plan.query_length, plan.prompt_length, plan.compress_ratio)
        pieces.append(h)
        new_lengths.append(len(h))
    return torch.cat(pieces), new_lengths


def _pool_passage(h: Tensor, query: int, prompt: int, ratio: int) -> Tensor:
    """h: (n, hidden) one sequence -> (query + ceil(P / ratio) + prompt, hidden)."""
    passage = len(h) - query - prompt  # P
    if passage <= 0:
        return h
    groups = -(-passage // ratio)
    padded = F.pad(h[query : query + passage], (0, 0, 0, groups * ratio - passage))
    # weights as the reference computes them, in the activations' dtype: 1 / group size
    weights = (torch.arange(groups * ratio, device=h.device) < passage).to(h.dtype)
    weights = weights.view(groups, ratio)
    weights = (weights / weights.sum(-1, keepdim=True)).view(-1)
    pooled = (padded * weights[:, None]).view(groups, ratio, -1).sum(1)  # (groups, hidden)
    return torch.cat((h[:query], pooled, h[len(h) - prompt :]))
