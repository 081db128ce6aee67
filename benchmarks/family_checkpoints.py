"""Random-weight checkpoints of issue-20 family shapes for `benchmarks/bench_families.py`.

As `benchmarks/make_model.py` does for Qwen3-Reranker: the published config values, seeded
N(0, 0.02) bf16 matrices (norms 1, biases 0), and make_model's byte-level BPE tokenizer with
Qwen's special tokens (24k tokens trained on the workload's English; "0" and "1" are single
tokens, as mxbai's recipe needs). Speed does not depend on the weights' values; the scores are
noise. Built once into ``~/.cache/rerankd-bench/`` (``$RERANKD_BENCH_CACHE``), keyed by this
file, make_model.py, workload.py and the transformers/tokenizers versions.

- ``mxbai-v2``: mixedbread-ai/mxbai-rerank-base-v2's config.json (Qwen2.5-0.5B:
  `Qwen2ForCausalLM`, hidden 896, 24 layers, 14 heads / 2 KV heads of 64, intermediate 4864,
  biases on q/k/v, tied embeddings of 151936 rows, rope_theta 1e6);
- ``jina-v3``: jinaai/jina-reranker-v3's config.json (`JinaForRanking`, Qwen3-0.6B: hidden 1024,
  28 layers, 16 heads / 8 KV heads of 128, intermediate 3072, tied) plus its projector
  (1024 → 512 → ReLU → 512), the tokenizer with `<|embed_token|>` and `<|rerank_token|>`
  and the hub's model_max_length 131072.

``layers`` overrides the depth (for a shorter run: docs/s scales ~1/depth at this width).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.make_model import WEIGHT_STD, build_tokenizer, cache_root

__all__ = ["FAMILIES", "ensure_checkpoint"]

_MARKER = ".rerankd-bench-complete"

#: mixedbread-ai/mxbai-rerank-base-v2 config.json (Qwen2.5-0.5B's values)
MXBAI_BASE_V2 = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    tie_word_embeddings=True,
    use_sliding_window=False,
    sliding_window=32768,
    max_window_layers=24,
)
#: jina-reranker-v3's special tokens and projector output (fixed in its modeling.py)
JINA_TOKENS = ("<|embed_token|>", "<|rerank_token|>")
JINA_PROJECTOR_DIM = 512


def _log(msg: str) -> None:
    print(f"[family_checkpoints] {msg}", file=sys.stderr, flush=True)


def _fill_(params, seed: int) -> None:
    """Matrices N(0, 0.02), biases 0, norm weights 1, in place."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in params:
            if param.ndim >= 2:
                param.normal_(0.0, WEIGHT_STD, generator=gen)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def _tokenizer_config(path: Path, **values) -> None:
    file = path / "tokenizer_config.json"
    config = json.loads(file.read_text())
    config.update(add_bos_token=False, add_eos_token=False, **values)
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_mxbai_v2(path: Path, layers: int | None = None, seed: int = 0) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    shape = {**MXBAI_BASE_V2, "num_hidden_layers": layers or MXBAI_BASE_V2["num_hidden_layers"]}
    config = Qwen2Config(
        **shape,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        dtype="bfloat16",
    )
    config.architectures = ["Qwen2ForCausalLM"]
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype=torch.bfloat16).to_empty(device="cpu")
    _fill_(model.named_parameters(), seed)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    _tokenizer_config(path)


def build_jina_v3(path: Path, layers: int | None = None, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file
    from tokenizers import AddedToken
    from transformers import Qwen3Config, Qwen3Model

    from tests.fixtures.jina_v3 import JINA_V3_CONFIG

    tok = build_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in JINA_TOKENS])
    values = {**JINA_V3_CONFIG, "num_hidden_layers": layers or JINA_V3_CONFIG["num_hidden_layers"]}
    values["max_window_layers"] = values["num_hidden_layers"]
    values["bos_token_id"] = tok.convert_tokens_to_ids("<|endoftext|>")
    values["eos_token_id"] = tok.convert_tokens_to_ids("<|im_end|>")
    shape = {k: v for k, v in values.items() if k not in ("auto_map", "architectures")}
    with torch.device("meta"):
        backbone = Qwen3Model(Qwen3Config(**shape))
    backbone = backbone.to(dtype=torch.bfloat16).to_empty(device="cpu")
    _fill_(backbone.named_parameters(), seed)
    state = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    hidden = values["hidden_size"]
    gen = torch.Generator().manual_seed(seed + 1)
    for name, rows, cols in (("0", hidden // 2, hidden), ("2", JINA_PROJECTOR_DIM, hidden // 2)):
        weight = torch.empty(rows, cols).normal_(0.0, WEIGHT_STD, generator=gen)
        state[f"projector.{name}.weight"] = weight.to(torch.bfloat16)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(path)
    _tokenizer_config(path, model_max_length=131072)


FAMILIES: dict[str, Callable[..., None]] = {"mxbai-v2": build_mxbai_v2, "jina-v3": build_jina_v3}


def _fingerprint(family: str, layers: int | None, seed: int) -> str:
    import tokenizers
    import transformers

    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for file in (Path(__file__), here / "make_model.py", here / "workload.py"):
        h.update(file.read_bytes())
    h.update(
        f"{family} {layers} {seed} {transformers.__version__} {tokenizers.__version__}".encode()
    )
    return h.hexdigest()[:10]


def ensure_checkpoint(family: str, layers: int | None = None, seed: int = 0) -> Path:
    """The cached checkpoint directory of `family` at `layers`, built on first use."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{family}-{layers or 'full'}L-random"
    target = root / f"{stem}-{_fingerprint(family, layers, seed)}"
    if (target / _MARKER).is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        started = time.perf_counter()
        FAMILIES[family](staging, layers, seed)
        (staging / _MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
        _log(f"{family} checkpoint written in {time.perf_counter() - started:.0f}s: {target}")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for stale in root.glob(f"{stem}-*"):
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return target
