"""A random-weight checkpoint of the bge-reranker-v2-m3 shape (XLM-R large), for W-ENC.

No weights can be downloaded here (and no XLM-R tokenizer is cached on this machine), and
speed does not depend on weight values, so the benchmark builds what a hub download of
BAAI/bge-reranker-v2-m3 looks like: `XLMRobertaForSequenceClassification` with its
config.json values (hidden 1024, 16 heads, intermediate 4096, vocab 250,002, 8,194
positions, one label), seeded random float32 weights in `model.safetensors`, and a Unigram
`XLMRobertaTokenizer` with the real vocabulary size. Every engine loads it as it loads the
real model (`save_pretrained` layout).

The tokenizer: a Unigram model trained (deterministically, one thread) on the benchmark's
generated English (`benchmarks/workload.py`), 24,000 pieces; then filler pieces made of a
private-use character (never present in input text, so never produced) up to the real
250,002 ids, `<mask>` last as in XLM-R. `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3; pairs are
`<s> q </s></s> d </s>`. Tokens per word are measured and printed by the benchmark.

Layers: 24 in the real model; `--layers N` builds fewer (W-ENC allows it, with the count
stated): per-token cost is linear in layers, so ratios between engines hold.

The classifier's bias is centred so raw scores over calibration pairs have mean 0; the
weights keep their initial scale. A random network scores every pair nearly alike (raw scores
differ by ~0.02 between documents), so rescaling the head to a reranker's spread would
amplify bf16 rounding as much as the signal (tried: a 110x gain made bf16 engines 1.3 off
and failed rerankd's start-up attention probe); at this scale |Δ| stays bf16's per-op size
and the benchmark prints the reference's spread next to it.

Cached under ``~/.cache/rerankd-bench/`` (``$RERANKD_BENCH_CACHE``), rebuilt only when this
file, ``workload.py``, the layer count or the transformers/tokenizers versions change.

    python -m benchmarks.make_encoder --layers 6      # prints the directory

What this does *not* give: real scores. Rankings from this checkpoint are noise.
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

__all__ = ["SHAPE", "ensure_encoder", "non_embedding_params"]

# BAAI/bge-reranker-v2-m3 config.json (XLMRobertaForSequenceClassification)
SHAPE = dict(
    vocab_size=250002,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    hidden_act="gelu",
    max_position_embeddings=8194,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    num_labels=1,
)
TOKENIZER_PIECES = 24000  # trained pieces; the rest of the 250,002 ids are unreachable fillers
MODEL_MAX_LENGTH = 8192  # the real tokenizer_config.json value
WEIGHT_STD = 0.02  # XLM-R's initializer_range: matrices and biases ~ N(0, 0.02)
_FILLER = "\U000f0000"  # Supplementary Private Use Area-A: no real text contains it
_MARKER = ".rerankd-bench-complete"


def _log(msg: str) -> None:
    print(f"[make_encoder] {msg}", file=sys.stderr, flush=True)


def non_embedding_params(layers: int) -> int:
    """Weights of the linear layers every token passes (q, k, v, o, up, down)."""
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    return layers * (4 * h * h + 2 * h * i)


def cache_root() -> Path:
    return Path(os.environ.get("RERANKD_BENCH_CACHE", "~/.cache/rerankd-bench")).expanduser()


def _fingerprint(layers: int, seed: int) -> str:
    import tokenizers
    import transformers

    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("make_encoder.py", "workload.py"):
        h.update((here / name).read_bytes())
    h.update(f"{layers} {seed} {transformers.__version__} {tokenizers.__version__}".encode())
    return h.hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def build_tokenizer(seed: int = 1234):
    """Unigram `XLMRobertaTokenizer` with 250,002 ids (see the module docstring)."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import Unigram
    from transformers.models.xlm_roberta.tokenization_xlm_roberta import XLMRobertaTokenizer

    from benchmarks.workload import corpus

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    # XLMRobertaTokenizer (transformers 5) rebuilds Unigram(vocab, unk_id=3) with
    # WhitespaceSplit + Metaspace(prepend "always"): train with that pre-tokenizer
    tk = Tokenizer(Unigram())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=TOKENIZER_PIECES,
        show_progress=False,
        special_tokens=specials,
        unk_token="<unk>",
        max_piece_length=12,
    )
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: a deterministic trainer
    try:
        tk.train_from_iterator(corpus(seed, n_lines=20_000), trainer)
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    trained = [tuple(p) for p in json.loads(tk.to_str())["model"]["vocab"]]
    if [p[0] for p in trained[:4]] != specials:
        raise RuntimeError(f"unexpected special pieces: {trained[:4]}")
    # round the log-probs and order ties by piece: the trainer's last bits vary run to run
    learned = sorted(((p, round(s, 4)) for p, s in trained[4:]), key=lambda x: (-x[1], x[0]))
    lowest = min(s for _, s in learned) - 10.0
    fillers = SHAPE["vocab_size"] - 1 - len(specials) - len(learned)
    pieces = (
        [(p, 0.0) for p in specials]
        + learned
        + [(f"{_FILLER}{i}", lowest) for i in range(fillers)]
        + [("<mask>", 0.0)]  # id 250001, as in XLM-R
    )
    tok = XLMRobertaTokenizer(
        vocab=pieces, model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False
    )
    if len(tok) != SHAPE["vocab_size"] or tok.convert_tokens_to_ids("<mask>") != 250001:
        raise RuntimeError(f"tokenizer has {len(tok)} ids; expected {SHAPE['vocab_size']}")
    return tok


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _calibration_pairs(n: int = 16) -> list[tuple[str, str]]:
    from benchmarks.workload import sweep_request

    req = sweep_request(n, seed=999)  # not a W-ENC seed
    return [(req.query, d) for d in req.documents]


def build_checkpoint(path: Path, layers: int, seed: int = 0) -> Path:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = build_tokenizer()
    _log(f"tokenizer: {len(tok)} ids in {time.perf_counter() - t0:.0f}s")
    config = XLMRobertaConfig(
        **{**SHAPE, "num_hidden_layers": layers},
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        dtype="float32",
    )
    config.architectures = ["XLMRobertaForSequenceClassification"]
    with torch.device("meta"):  # no default init of 250k x 1024 embeddings, then overwritten
        model = XLMRobertaForSequenceClassification(config)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 or name.endswith("bias"):
                param.normal_(0.0, WEIGHT_STD, generator=gen)
            else:  # LayerNorm weights
                param.normal_(1.0, WEIGHT_STD, generator=gen)
        for buf_name, buf in model.named_buffers():  # position_ids / token_type_ids
            if "position_ids" in buf_name:
                buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
            else:
                buf.zero_()
    model.eval()
    # centre the head: raw scores with mean 0 on calibration pairs (module docstring)
    with torch.inference_mode():
        logits = torch.cat(
            [model(**tok(q, d, return_tensors="pt")).logits[:, 0] for q, d in _calibration_pairs()]
        )
    with torch.no_grad():
        model.classifier.out_proj.bias.sub_(logits.mean())
    _log(f"calibration raw scores: std {float(logits.std()):.4f} across documents")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    _log(f"{layers}-layer checkpoint written in {time.perf_counter() - t0:.0f}s: {path}")
    return path


def ensure_encoder(layers: int = 24, seed: int = 0) -> Path:
    """The cached checkpoint directory for `layers`, built on first use (atomic rename)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    prefix = f"bge-reranker-v2-m3-{layers}l-random-"
    target = root / f"{prefix}{_fingerprint(layers, seed)}"
    if (target / _MARKER).is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        build_checkpoint(staging, layers, seed)
        (staging / _MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for stale in root.glob(f"{prefix}*"):  # older builds of this layer count
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Build (or find) a random-weight bge-reranker-v2-m3-shaped checkpoint."
    )
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(ensure_encoder(args.layers, args.seed))


if __name__ == "__main__":
    main()
