"""Record FlagEmbedding's `LightWeightFlagLLMReranker` on the tiny gemma2-lightweight fixture,
run under transformers 4.46.3 (the version its Gemma2 model code was written for).

Its `CostWiseGemmaForCausalLM` calls transformers 4.46's `Gemma2DecoderLayer` with 4.46's
signature (rotary tables inside the attention, the sliding window applied by the layer, a tuple
returned); transformers 5 changed all three, so rerankd's venv cannot run it as it runs. This
script builds the fixture in rerankd's venv, then runs the package's own `compute_score` in an
interpreter that sees transformers 4.46.3 first, and records into
tests/data/gemma2_lightweight/flagembedding.json: the fixture's fingerprint, the token ids the
reference feeds its model with its query/prompt lengths, and its scores for each setting
(float32 and bf16), plus one run with eager attention (see `ATTENTION`). Regenerate after
changing the fixture (from the repository root, in rerankd's venv):

    python -m pip install --no-deps --target /tmp/tf446 transformers==4.46.3 \\
        tokenizers==0.20.3 huggingface_hub==0.26.5
    python -m tests.recipes.lightweight_golden /tmp/tf446

The overlay holds only transformers 4.46.3 and the tokenizers/hub versions it pins; torch and
FlagEmbedding are the venv's. FlagEmbedding's package `__init__` imports `datasets` and `peft`
(fine-tuning code the reranker does not use; the venv's builds need a newer hub), so the
recording interpreter stubs those two modules; nothing else is changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GOLDEN = (
    Path(__file__).resolve().parent.parent / "data" / "gemma2_lightweight" / "flagembedding.json"
)

QUERIES = ["what is panda?", "what is the capital of china?"]
DOCUMENTS = [
    "hi",
    "The giant panda is a bear species endemic to China.",
    "Beijing is the capital of China. 北京是中华人民共和国的首都。🎉",
    "",
    # long enough to be cut to FlagEmbedding's L = 512 passage tokens
    " ".join(f"panda bamboo forest {i} mountains of Sichuan." for i in range(160)),
]
PAIRS = [[q, d] for q in QUERIES for d in DOCUMENTS]
#: (cutoff_layers, compress_ratio, compress_layers) as FlagEmbedding takes them; the first is
#: the model card's; None cutoff: the reference's default (the last layer)
SETTINGS: list[tuple[list[int] | None, int, list[int]]] = [
    ([28], 2, [24, 40]),
    (None, 1, [8]),  # the package's own defaults: full depth, no compression
    ([42], 1, [8]),
    ([28], 1, [24, 40]),
    ([42], 2, [24, 40]),
    ([8], 2, [24, 40]),
    ([42], 4, [8]),
    ([20], 8, [1, 9, 19]),
    ([16], 2, [0, 12, 16]),  # layer 0 never compresses; a cutoff's own layer reads before
    ([10, 28], 2, [24, 40]),  # a list: one score list per layer, head k for the k-th layer
    ([28, 42, 35], 3, [30]),
]
#: FlagEmbedding loads `CostWiseGemmaForCausalLM` with transformers' default attention, which
#: for this class (a plain `PreTrainedModel` with `_supports_sdpa`) is SDPA: 4.46's
#: `Gemma2SdpaAttention` ignores `attn_logit_softcapping`. The eager run shows what soft-capping
#: would change.
ATTENTION = ("sdpa", "eager")

_REFERENCE = r"""
import importlib.machinery, json, sys, types
import transformers.utils.import_utils  # probes the installed packages before the stubs

class _Stub(types.ModuleType):
    __path__ = []
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})

for name in ("datasets", "peft"):
    module = _Stub(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = module

import torch
import transformers
from FlagEmbedding import LightWeightFlagLLMReranker

model_dir, pairs, settings = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {"transformers": transformers.__version__, "torch": torch.__version__}
fed = {}

def record(_module, _args, kwargs):
    for ids, mask, q, p in zip(kwargs["input_ids"], kwargs["attention_mask"],
                               kwargs["query_lengths"], kwargs["prompt_lengths"]):
        fed[json.dumps(ids[mask.bool()].tolist())] = [q, p]

def run(reranker, cutoff, ratio, layers):
    return reranker.compute_score(pairs, cutoff_layers=cutoff, compress_ratio=ratio,
                                  compress_layers=layers)

for dtype in ("float32", "bfloat16"):
    reranker = LightWeightFlagLLMReranker(model_dir, use_bf16=dtype == "bfloat16", devices="cpu")
    out["attention"] = reranker.model.config._attn_implementation
    reranker.model.register_forward_pre_hook(record, with_kwargs=True)
    out[dtype] = [run(reranker, *s) for s in settings]
out["fed"] = [{"input_ids": json.loads(k), "query_length": v[0], "prompt_length": v[1]}
              for k, v in fed.items()]
from FlagEmbedding.inference.reranker.decoder_only.models.gemma_model import (
    CostWiseGemmaForCausalLM,
)
eager = LightWeightFlagLLMReranker(model_dir, use_bf16=False, devices="cpu")
eager.model = CostWiseGemmaForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
out["float32_eager"] = [run(eager, *s) for s in settings[:2]]
print(json.dumps(out))
"""


def fingerprint(model_dir: Path) -> str:
    """sha256 of the fixture's weights and tokenizer: the recording is of exactly these."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        h.update((Path(model_dir) / name).read_bytes())
    return h.hexdigest()


def main(overlay: str) -> None:
    from tests.fixtures.gemma2_lightweight import build_gemma2_lightweight

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_gemma2_lightweight(Path(tmp) / "gemma2-lightweight")
        env = {**os.environ, "PYTHONPATH": overlay, "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            [sys.executable, "-c", _REFERENCE, str(model_dir), json.dumps(PAIRS),
             json.dumps(SETTINGS)],
            check=True, capture_output=True, text=True, env=env,
        )  # fmt: skip
        recorded = json.loads(result.stdout.strip().splitlines()[-1])
        recorded = {
            "fixture_sha256": fingerprint(model_dir),
            "pairs": PAIRS,
            "settings": SETTINGS,
            **recorded,
        }
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(recorded, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tf446")
