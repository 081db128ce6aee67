"""No host sync in a CUDA forward, checked on CPU (issue 17: at most one per batch, the
read of its scores). `tests.host_syncs.HostSyncs` records what would make the host wait
for the device; each test runs a CUDA path on CPU, with the CUDA choices forced (the
fallback attention kernels of `ops.attention.ATTENTION`; `varlen_attn` through a stand-in
of torch 2.11's signature), on a fresh batch, so the per-batch metadata the kernels build
(layouts, buckets, masks) is recorded as well as every layer's work."""

from __future__ import annotations

import random

import pytest
import torch

from rerankd.models import modernbert
from rerankd.models.kernels import Kernels
from rerankd.models.modernbert import CHUNK_SPAN
from rerankd.ops.attention import ATTENTION
from rerankd.ops.batch import pack, upload
from rerankd.types import Batch, EncodedPair
from tests.fixtures.modernbert import random_modernbert
from tests.host_syncs import HostSyncs, opaque
from tests.loaded import loaded_fixture

CPU = torch.device("cpu")
#: the CUDA kernels of `ops.attention.cuda_backends` that run on CPU (flash_attn: CUDA only)
CUDA_BACKENDS = ["varlen", "flex", "sdpa_padded"]


def varlen_attn_2_11(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
):
    """A stand-in with torch 2.11's `varlen_attn` signature: one kernel launch on CUDA, so
    only the shapes matter here."""
    assert key.shape[1] == query.shape[1] == value.shape[1], "2.11 varlen_attn has no GQA"
    return query.new_zeros(query.shape)


@pytest.fixture(autouse=True)
def cuda_kernels(monkeypatch):
    """Kernels as a CUDA machine runs them: `varlen_attn` (the 2.11 stand-in) and
    flex_attention (on CUDA one compiled kernel; its eager CPU path even refuses a dispatch
    mode) opaque to the recorder."""
    import torch.nn.attention.flex_attention as flex_module
    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", varlen_attn_2_11)
    monkeypatch.setattr(flex_module, "flex_attention", opaque(flex_module.flex_attention))


# --- the recorder -----------------------------------------------------------------------------

_T = torch.arange(6)
#: (what a forward might do, the sync-free way to do it)
SYNC_AND_FREE_TWIN = {
    "item": (lambda: _T.max().item(), lambda: _T.max()),
    "int": (lambda: int(_T[2]), lambda: _T[2] + 1),
    "if-tensor": (lambda: bool(_T.sum() > 3), lambda: _T.sum() > 3),
    "tolist": (lambda: _T.tolist(), lambda: _T.clone()),
    "cpu": (lambda: _T.cpu(), lambda: _T.contiguous()),
    "nonzero": (lambda: (_T > 2).nonzero(), lambda: torch.where(_T > 2, _T, 0)),
    "boolean-index": (lambda: _T[_T > 2], lambda: _T[_T[3:]]),
    "boolean-index-put": (
        lambda: _T.clone().__setitem__(_T > 2, 0),
        lambda: _T.clone().index_fill_(0, _T[3:], 0),
    ),
    "repeat-interleave": (
        lambda: _T.repeat_interleave(_T),
        lambda: _T.repeat_interleave(_T, output_size=15),
    ),
    "host-list": (lambda: torch.tensor([1, 2, 3]), lambda: upload([[1, 2, 3]], CPU)),
    "to-device": (lambda: _T.to(CPU), lambda: _T.to(torch.float32)),
}


@pytest.mark.parametrize("name", SYNC_AND_FREE_TWIN)
def test_the_recorder_sees_a_host_sync_and_not_its_sync_free_twin(name):
    """So that an empty record below means something; under inference mode too, where the
    dispatcher sees other overloads (the engine's forwards run in it)."""
    sync, free = SYNC_AND_FREE_TWIN[name]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), HostSyncs() as syncs:
            sync()
        assert len(syncs.found) == 1, syncs.report()
        assert "test_host_syncs.py" in syncs.found[0].where
        with mode(), HostSyncs() as syncs:
            free()
        assert syncs.found == [], syncs.report()


# --- attention kernels ------------------------------------------------------------------------


def _pairs(shared: bool) -> tuple[list[EncodedPair], list[int] | None]:
    """Lengths for several padded buckets (0.8 fill), with and without shared prefixes."""
    rng = random.Random(0)
    prefix = tuple(rng.randrange(1000) for _ in range(20)) if shared else ()
    pairs = [
        EncodedPair(prefix + tuple(rng.randrange(1000) for _ in range(n)))
        for n in (3, 1, 30, 7, 64, 17, 16, 2)
    ]
    return pairs, ([0, 0, 0, 0, 1, 1, 2, 3] if shared else None)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "no-prefix"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_attention_kernels_never_sync(backend, shared, causal):
    """Two layers' calls on a fresh batch: the first also builds the batch's layout, buckets
    and masks, the second reuses them. GQA (4 query heads, 2 key/value heads)."""
    batch = pack(*_pairs(shared), CPU)
    g = torch.Generator().manual_seed(0)
    t, p = len(batch.input_ids), sum(batch.prefix_lengths)
    q = torch.randn(t, 4, 16, generator=g)
    k, v = (torch.randn(t, 2, 16, generator=g) for _ in range(2))
    prefix = tuple(torch.randn(p, 2, 16, generator=g) for _ in range(2)) if p else None
    with torch.inference_mode(), HostSyncs() as syncs:
        for _ in range(2):
            ATTENTION[backend](q, k, v, batch, prefix, causal, 0.25)
    assert syncs.found == [], syncs.report()


# --- ModernBERT -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", [*CUDA_BACKENDS, "sdpa"])
@pytest.mark.parametrize("layers", [1, 4])
def test_modernbert_forward_never_syncs(backend, layers, monkeypatch):
    """Global layers on `backend`; local ones on its windowed partner: the windowed varlen
    kernel, or SDPA on padded band buckets (several: a small bucket budget) and, past
    `CHUNK_SPAN`, in query chunks. One layer (global) and four (global, local, local,
    global): nothing recorded in either, so nothing per batch and nothing per layer."""
    monkeypatch.setattr(modernbert, "PADDED_BUCKET_TOKENS", 64)
    rng = random.Random(0)
    lengths = (3, 9, 10, 40, 1, 25, 26, CHUNK_SPAN + 30)
    pairs = [EncodedPair(tuple(rng.randrange(100) for _ in range(n))) for n in lengths]
    model = random_modernbert(layers)
    model.set_kernels(Kernels(backend))
    with torch.inference_mode(), HostSyncs() as syncs:
        model(pack(pairs, None, CPU))
    assert syncs.found == [], syncs.report()


# --- a whole batch through the packed engine --------------------------------------------------

ENGINE_FIXTURES = {"qwen3": 512, "xlmr": 128}  # decoder (shared prefixes, GQA), encoder


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("fixture", ENGINE_FIXTURES)
def test_a_packed_engine_batch_syncs_once_to_read_its_scores(fixture, backend):
    """Pack, forward and scores of one batch with two shared-prefix groups: the one host
    sync is the read of the scores."""
    served = loaded_fixture(fixture, ENGINE_FIXTURES[fixture])
    engine = served.scheduler.engine
    documents = ["Beijing is the capital.", "Paris lies on the Seine " * 6, "", "yes no"]
    pairs = served.recipe.encode(["capital of china?"] * 4, documents)
    pairs += served.recipe.encode(["where is paris"] * 2, documents[:2])
    batch = Batch(pairs, [0, 0, 0, 0, 1, 1])
    try:
        engine.use_kernels(backend)
        with HostSyncs() as syncs:
            engine.forward(batch.pairs, batch.groups)
    finally:
        engine.use_kernels("sdpa")
    assert [s.kind for s in syncs.found] == ["Tensor.tolist"], syncs.report()
    assert "packed_engine.py" in syncs.found[0].where
