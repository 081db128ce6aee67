"""Random-weight checkpoints of the real Qwen3-Reranker shapes, for benchmarks.

No weights can be downloaded here, and speed does not depend on their values, so the
benchmarks build a checkpoint directory with the published *shape* (config.json values of
Qwen/Qwen3-Reranker-0.6B / -4B), seeded random bf16 weights, and a byte-level BPE tokenizer
trained on the benchmark's generated English (``benchmarks/workload.py``) with Qwen's special
tokens. Every server loads it exactly like a hub download (``save_pretrained`` layout).

The directory is cached under ``~/.cache/rerankd-bench/`` (``$RERANKD_BENCH_CACHE``) and
rebuilt only when this file, ``workload.py`` or the transformers/tokenizers versions change.

    python -m benchmarks.make_model --size 0.6b      # prints the directory

What this does *not* give: real scores. Rankings from these checkpoints are noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["SHAPES", "cache_root", "ensure_model", "non_embedding_params"]

# Published config.json values (Qwen3ForCausalLM). vocab_size is the embedding's row count;
# our tokenizer uses only its first ~24k rows (ids beyond it are never looked up).
SHAPES: dict[str, dict] = {
    "0.6b": dict(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        tie_word_embeddings=True,
    ),
    "4b": dict(
        hidden_size=2560,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=9728,
        tie_word_embeddings=False,
    ),
}
_COMMON = dict(
    vocab_size=151669,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    use_sliding_window=False,
)

TOKENIZER_VOCAB = 24000  # BPE merges + bytes; chosen so the workload's words average ~1.1 tokens
WEIGHT_STD = 0.02  # matrices ~ N(0, 0.02) as Qwen's initializer_range; norms 1 + N(0, 0.02)
_MARKER = ".rerankd-bench-complete"

# Qwen2/Qwen3 pre-tokenizer regex (transformers' Qwen2Tokenizer).
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _log(msg: str) -> None:
    print(f"[make_model] {msg}", file=sys.stderr, flush=True)


def linear_widths(size: str) -> tuple[int, int, int, int]:
    """(hidden, query heads x head dim, key/value heads x head dim, intermediate) of a shape:
    the widths of its linears, for GEMM ceilings."""
    s = SHAPES[size]
    return (
        s["hidden_size"],
        s["num_attention_heads"] * s["head_dim"],
        s["num_key_value_heads"] * s["head_dim"],
        s["intermediate_size"],
    )


def non_embedding_params(size: str) -> int:
    """Weights of the linear layers every token passes (q, k, v, o, gate, up, down)."""
    s = SHAPES[size]
    h, hd = s["hidden_size"], s["head_dim"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * s["intermediate_size"]
    return per_layer * s["num_hidden_layers"]


def cache_root() -> Path:
    return Path(os.environ.get("RERANKD_BENCH_CACHE", "~/.cache/rerankd-bench")).expanduser()


def _fingerprint(size: str, seed: int) -> str:
    import tokenizers
    import transformers

    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("make_model.py", "workload.py"):
        h.update((here / name).read_bytes())
    h.update(f"{size} {seed} {transformers.__version__} {tokenizers.__version__}".encode())
    return h.hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def build_tokenizer(seed: int = 1234, vocab_size: int = TOKENIZER_VOCAB):
    """Byte-level BPE with Qwen's pipeline (NFC, Qwen regex split, byte-level) and Qwen's
    special tokens, as a transformers ``Qwen2Tokenizer``; "yes" and "no" are single tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    from benchmarks.workload import corpus

    tk = Tokenizer(
        BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tk.train_from_iterator(corpus(seed), trainer)
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]

    tok = Qwen2Tokenizer(
        vocab=dict(model["vocab"]),
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=None,
        pad_token=None,
        errors="replace",
        model_max_length=131072,
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    # Qwen's order: <|endoftext|>, <|im_start|>, <|im_end|> (special) ... <think>, </think>
    # (added, not special), all after the BPE vocabulary.
    tok.add_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
        ],
        special_tokens=True,
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")]
    )
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    for word in ("yes", "no"):
        ids = tok.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"benchmark tokenizer: {word!r} is not a single token: {ids}")
    return tok


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def build_checkpoint(path: Path, size: str, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = build_tokenizer()
    _log(f"tokenizer: {len(tok)} tokens in {time.perf_counter() - t0:.0f}s")
    shape = {**_COMMON, **SHAPES[size]}
    rope_theta = shape.pop("rope_theta")
    config = Qwen3Config(
        **shape,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        dtype="bfloat16",
    )
    config.architectures = ["Qwen3ForCausalLM"]
    # build on meta (no fp32 init of billions of weights), then fill bf16 storage in place
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model = model.to(dtype=torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, WEIGHT_STD, generator=gen)
            else:
                param.normal_(1.0, WEIGHT_STD, generator=gen)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    # Hub files keep these keys; older transformers (vLLM's) read rope_theta at the top level.
    cfg = json.loads((path / "config.json").read_text())
    cfg.setdefault("rope_theta", rope_theta)
    cfg["torch_dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tcfg = json.loads((path / "tokenizer_config.json").read_text())
    tcfg.update(add_bos_token=False, add_eos_token=False)
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, sort_keys=True) + "\n")
    _log(f"{size} checkpoint written in {time.perf_counter() - t0:.0f}s: {path}")
    return path


def ensure_model(size: str = "0.6b", seed: int = 0) -> Path:
    """The cached checkpoint directory for ``size``, built on first use (atomic rename)."""
    if size not in SHAPES:
        raise KeyError(f"unknown size {size!r}; known: {', '.join(SHAPES)}")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"qwen3-reranker-{size}-random-{_fingerprint(size, seed)}"
    if (target / _MARKER).is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        build_checkpoint(staging, size, seed)
        (staging / _MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    # older builds of this size (other fingerprints) are 1-8 GB each: drop them
    for stale in root.glob(f"qwen3-reranker-{size}-random-*"):
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Build (or find) a random-weight Qwen3-Reranker checkpoint."
    )
    parser.add_argument("--size", choices=sorted(SHAPES), default="0.6b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(ensure_model(args.size, args.seed))


if __name__ == "__main__":
    main()
