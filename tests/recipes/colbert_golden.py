"""Record PyLate's own token ids and MaxSim scores on the tiny ColBERT fixtures.

PyLate (1.6.0) pins sentence-transformers 5.3.0 and transformers <= 5.3 and pulls CUDA torch
through fastkmeans/fast-plaid, so it cannot live in rerankd's venv (sentence-transformers
6.x, torch 2.13 CPU) nor in the `test` extra. It runs in a venv of its own; this script
records what it computes into tests/data/colbert/pylate.json, which tests/recipes/
test_colbert.py compares rerankd with. Regenerate after changing the fixtures:

    python3 -m venv /tmp/pylate-venv
    /tmp/pylate-venv/bin/pip install torch==2.13.0 sentence-transformers==5.3.0 \\
        transformers==5.3.0 datasets ujson accelerate pandas
    /tmp/pylate-venv/bin/pip install --no-deps pylate==1.6.0
    python -m tests.recipes.colbert_golden /tmp/pylate-venv/bin/python

(run from the repository root in rerankd's venv: the fixtures are built there, then PyLate's
venv loads them, exactly as it would a hub download).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "colbert" / "pylate.json"

QUERIES = ["What is the capital of China?", "  gravity   "]
DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force, that attracts two bodies!",
    "Paris is the capital of France.",
    "北京是中华人民共和国的首都。🎉",
    "",
    "word word. word, ",
    "alpha beta gamma " * 150,  # longer than document_length: cut at its end
]

_PYLATE = """
import json, sys
import torch
import pylate
from pylate import models, rank, scores

model_dir, queries, documents = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
m = models.ColBERT(model_dir, device="cpu")
q = m.encode(queries, is_query=True, batch_size=4)
d = m.encode(documents, is_query=False, batch_size=4)
out = {
    "pylate": pylate.__version__,
    "query_ids": [m.tokenize([t], is_query=True)["input_ids"][0].tolist() for t in queries],
    "document_ids": [m.tokenize([t], is_query=False)["input_ids"][0].tolist() for t in documents],
    # one document at a time: rank.rerank pads a candidate list with zero vectors, which
    # can lift a short document's MaxSim (a max over its own tokens and 0)
    "scores": [
        [float(scores.colbert_scores(torch.as_tensor(x)[None], torch.as_tensor(y)[None])[0, 0])
         for y in d]
        for x in q
    ],
    "rerank": [
        [r["id"] for r in row]
        for row in rank.rerank([list(range(len(documents)))] * len(queries), q, [d] * len(queries))
    ],
}
print(json.dumps(out))
"""


def record(pylate_python: str) -> dict:
    from tests.fixtures.colbert import (
        build_colbert_bert,
        build_colbert_modernbert,
        build_colbert_xlmr,
    )

    golden = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (
            ("bert", build_colbert_bert),
            ("xlmr", build_colbert_xlmr),
            ("modernbert", build_colbert_modernbert),
        ):
            path = build(Path(tmp) / name)
            run = subprocess.run(
                [
                    pylate_python,
                    "-c",
                    _PYLATE,
                    str(path),
                    json.dumps(QUERIES),
                    json.dumps(DOCUMENTS),
                ],
                capture_output=True,
                text=True,
                check=True,
                env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
            )
            golden[name] = json.loads(run.stdout.strip().splitlines()[-1])
    return golden


if __name__ == "__main__":
    data = record(sys.argv[1])
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}")
