"""No host sync in a CUDA forward, per attention backend, checked by torch itself:
`torch.cuda.set_sync_debug_mode("error")` makes any synchronizing call (`.item()`,
`nonzero`, boolean-mask indexing, a copy from pageable memory, ...) raise. Every forward
runs once to warm up (first calls load kernels; flex_attention compiles), then again on a
freshly packed batch of the same shapes under the check, so the per-batch metadata the
kernels build (varlen layout, padded buckets, document masks) is checked with the layers.
tests/test_host_syncs.py checks the same paths on CPU with a recorder."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from rerankd.ops.attention import ATTENTION, cuda_backends
from rerankd.ops.batch import pack
from rerankd.types import EncodedPair

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
#: the tiny fixtures the engine test serves (decoder: shared prefixes, GQA; encoder), with
#: the longest input each takes
FIXTURES = {"qwen3": 512, "xlmr": 128}
#: every kernel the engine may pick on CUDA: the fused ones and per-sequence SDPA, its last
#: resort
BACKENDS = [*cuda_backends(), "sdpa"]


@contextlib.contextmanager
def no_host_sync():
    """Any synchronizing CUDA call in the block raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _pairs(lengths, prefix: int = 0, seed: int = 0, vocab: int = 1000) -> list[EncodedPair]:
    """Random token ids below `vocab` (the model's: an id past its embedding is a
    device-side assert on CUDA, which poisons the process for every later test)."""
    rng = random.Random(seed)
    shared = tuple(rng.randrange(vocab) for _ in range(prefix))
    return [EncodedPair(shared + tuple(rng.randrange(vocab) for _ in range(n))) for n in lengths]


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_kernel_never_syncs(backend):
    """Qwen3-0.6B's head shape (16 query heads, 8 key/value heads, D 128), shared prefixes,
    causal and not, lengths for several padded buckets; two layers' calls each."""
    pairs, groups = _pairs((300, 17, 129, 1, 256, 64), prefix=80), [0, 0, 0, 0, 1, 1]
    g = torch.Generator(device=CUDA).manual_seed(0)

    def attend(batch, causal):
        t, p = len(batch.input_ids), sum(batch.prefix_lengths)
        q = torch.randn(t, 16, 128, generator=g, device=CUDA, dtype=torch.bfloat16)
        k, v = (torch.randn(t, 8, 128, generator=g, device=CUDA, dtype=q.dtype) for _ in "kv")
        prefix = tuple(
            torch.randn(p, 8, 128, generator=g, device=CUDA, dtype=q.dtype) for _ in "kv"
        )
        return [ATTENTION[backend](q, k, v, batch, prefix, causal, 128**-0.5) for _ in range(2)]

    for causal in (True, False):
        attend(pack(pairs, groups, CUDA), causal)  # warm-up
        batch = pack(pairs, groups, CUDA)
        with no_host_sync():
            outputs = attend(batch, causal)
        assert all(o.isfinite().all() for o in outputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modernbert_forward_never_syncs(backend):
    """Global and local layers (the local ones on the windowed varlen kernel or the band
    buckets, and a sequence past `CHUNK_SPAN` in query chunks), bf16, head dim 64."""
    from rerankd.models.kernels import Kernels
    from rerankd.models.modernbert import CHUNK_SPAN
    from tests.fixtures.modernbert import random_modernbert

    model = random_modernbert(4, hidden=128, heads=2, device=CUDA, dtype=torch.bfloat16)
    model.set_kernels(Kernels(backend))
    vocab = model.tok_embeddings.num_embeddings
    pairs = _pairs((3, 9, 10, 40, 1, 25, 26, CHUNK_SPAN + 30), vocab=vocab)
    with torch.inference_mode():
        expected = model(pack(pairs, None, CUDA))  # warm-up
        batch = pack(pairs, None, CUDA)
        with no_host_sync():
            got = model(batch)
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=0)  # index_add_ order may vary


@pytest.mark.parametrize("backend", cuda_backends())
@pytest.mark.parametrize("fixture", FIXTURES)
def test_packed_engine_prepare_and_launch_never_sync(fixture, backend):
    """The scheduler's pipeline on each backend, shared prefixes included: `prepare` and
    `launch` queue work without waiting; `collect` is the batch's one sync."""
    from rerankd.types import Batch
    from tests.loaded import loaded_fixture

    served = loaded_fixture(
        fixture, FIXTURES[fixture], device="cuda", dtype="bfloat16", attention="auto"
    )
    engine = served.scheduler.engine
    documents = ["Beijing is the capital.", "Paris lies on the Seine " * 6, "", "yes no"]
    pairs = served.recipe.encode(["capital of china?"] * 4, documents)
    pairs += served.recipe.encode(["where is paris"] * 2, documents[:2])
    batch = Batch(pairs, [0, 0, 0, 0, 1, 1])
    picked = engine.attention
    try:
        engine.use_kernels(backend)
        expected = engine.score(batch)  # warm-up
        with no_host_sync():
            pending = engine.launch(engine.prepare(batch))
        got = engine.collect(pending)
    finally:
        engine.use_kernels(picked)
    assert got == pytest.approx(expected, abs=1e-2)
