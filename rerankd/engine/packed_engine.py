"""The packed engine: our own model code on flat token streams with shared prefixes.

Same contract as every engine (`score(batch) -> raw scores`). Pairs of one request share
their common token prefix, computed once per batch; no padding is ever computed; only the
last token of each sequence reaches the final norm and score head. Attention: on CUDA the
varlen flash-attention kernel, on CPUs rerankd's AMX or AVX512-BF16 kernel for bf16, each
used only when it agrees with per-sequence SDPA on this device (and, on CPU, is measured
faster than it); SDPA otherwise.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from rerankd.engine.base import PendingScores, default_batch_tokens, split_on_oom
from rerankd.engine.compile_policy import (
    graphs_pay,
    model_family,
    scores_disagree,
    wants_compile,
)
from rerankd.engine.cuda_graphs import DEFAULT_CAPACITY, Capture, GraphRunner
from rerankd.models.kernels import Kernels
from rerankd.ops.attention import VARLEN_BACKENDS, cpu_backends, cuda_backends, describe
from rerankd.ops.attention_speed import speedup_over_sdpa
from rerankd.ops.batch import PackedBatch, pack
from rerankd.ops.quantize import QUANTIZE_MODES
from rerankd.ops.static_batch import RowLayout
from rerankd.types import EncodedPair

log = logging.getLogger(__name__)

#: largest |Δ raw score| between two code paths accepted at start-up: bf16 noise, not a broken
#: kernel (off by O(1)). On the tiny Qwen3 fixture's probe bf16 SDPA and the AMX kernel are
#: each up to 0.045 from float32, so two bf16 paths may differ by twice that
_BACKEND_TOLERANCE = 0.1
#: the same with int8 linears: compiled and eager kernels may round an activation to the
#: other side of an int8 step (measured 0.06 on the Qwen3-0.6B-shape probe)
_INT8_BACKEND_TOLERANCE = 0.25

COMPILE_MODES = ("auto", "on", "off")
GRAPH_MODES = ("auto", "on", "off")
ATTENTION_MODES = ("auto", "sdpa", "amx", "avx512")


@dataclass(frozen=True)
class GraphBatch:
    """A prepared batch for a CUDA graph: its bucketed layout, and the batch itself in case
    it must run without the graph after all (`PackedEngine.launch`)."""

    layout: RowLayout
    pairs: list[EncodedPair]
    groups: list[int] | None


def check_mode(flag: str, mode: str, modes: tuple[str, ...]) -> None:
    """ValueError naming the flag and its choices unless `mode` is one of `modes`; the one
    check of --quantize, --compile and --attention (runtime.py asks before loading)."""
    if mode not in modes:
        raise ValueError(f"unknown --{flag} {mode!r}; use {_choices(modes)}")


def check_modes(quantize: str, compile: str, attention: str, cuda_graphs: str = "auto") -> None:
    """`check_mode` of the packed-engine flags, in this order."""
    check_mode("quantize", quantize, QUANTIZE_MODES)
    check_mode("compile", compile, COMPILE_MODES)
    check_mode("attention", attention, ATTENTION_MODES)
    check_mode("cuda-graphs", cuda_graphs, GRAPH_MODES)


def _reason(exc: BaseException) -> str:
    """An exception in one line for a log: its type and the first line of its message."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _choices(modes: tuple[str, ...]) -> str:
    """("auto", "on", "off") -> "auto, on or off"."""
    return f"{', '.join(modes[:-1])} or {modes[-1]}" if len(modes) > 1 else modes[0]


class PackedEngine:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        share_prefix: bool,
        vocab_size: int,
        name: str = "packed",
        compile: str = "off",
        quantized: bool = False,
        attention: str = "auto",
        cuda_graphs: str = "off",
    ) -> None:
        self.model = model
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.name = name
        self._device = device
        self.share_prefix = share_prefix
        self.vocab_size = vocab_size
        self.default_batch_tokens = default_batch_tokens(device)
        self.quantized = quantized
        self.tolerance = _INT8_BACKEND_TOLERANCE if quantized else _BACKEND_TOLERANCE
        self.attention = "sdpa"  # what `forward` reads while the probes below run
        #: replays captured CUDA graphs when set (`enable_graphs`, after the probes below)
        self.graphs: GraphRunner | None = None
        self.use_kernels(self._pick_attention(attention, device, dtype))
        self.compiled = (
            self._wants_compile(compile, device, dtype, quantized) and self._compile_agrees()
        )
        if self._wants_graphs(cuda_graphs, dtype, quantized):
            self.enable_graphs()

    @property
    def kernel(self) -> str:
        """The attention kernel in use, as `/v1/models` names it."""
        return describe(self.attention)

    def use_kernels(self, attention: str, compiled: bool = False) -> None:
        """Run attention kernel `attention` (a key of `ops.attention.ATTENTION`) and eager or
        compiled per-token work: the one place the model gets its kernels (`set_kernels`,
        models/kernels.py), and the layout `forward` packs for that kernel."""
        self.model.set_kernels(Kernels(attention, compiled))
        self.attention = attention

    def score(self, batch) -> list[float]:
        return split_on_oom(self.forward, batch.pairs, batch.groups, self._device)

    # --- the scheduler's one-ahead pipeline (CUDA): prepare, launch, collect ---------------

    @property
    def pipelined(self) -> bool:
        """Whether the scheduler may run this engine one batch ahead: on CUDA, where `launch`
        returns while the kernels run, and only with this class's own `forward` and `score`
        (a subclass with another one, e.g. layerwise or lightweight, or a wrapped forward, e.g.
        fault injection, scores through `score`)."""
        return (
            self._device.type == "cuda"
            and type(self).forward is PackedEngine.forward
            and type(self).score is PackedEngine.score
            and "forward" not in vars(self)
        )

    @torch.inference_mode()
    def prepare(self, batch) -> PackedBatch | GraphBatch:
        """Pack `batch` and start its upload (page-locked, non-blocking): `forward`'s first
        half, run while the previous batch's kernels still run. With CUDA graphs, the
        bucketed layout on the host (the upload goes into the graph's buffers at launch)."""
        layout = self._graph_layout(batch.pairs, batch.groups)
        if layout is not None:
            return GraphBatch(layout, batch.pairs, batch.groups)
        return self._pack(batch.pairs, batch.groups)

    @torch.inference_mode()
    def launch(self, packed: PackedBatch | GraphBatch) -> PendingScores:
        """Queue the model's kernels on `packed`; returns without waiting for them. A batch
        laid out for a graph that is no longer there (graphs turned off, or its place
        taken by a batch scored in between) is packed and run without one."""
        if isinstance(packed, GraphBatch):
            if self.graphs is not None and self.graphs.admits(packed.layout.bucket):
                return PendingScores(self._replay(packed.layout))
            packed = self._pack(packed.pairs, packed.groups)
        return PendingScores(self.model(packed))

    def collect(self, pending: PendingScores) -> list[float]:
        """The raw scores of a launched batch (waits for them: the batch's one host sync).
        Any failure of prepare/launch/collect makes the scheduler rerun the batch through
        `score` (split on OOM and all)."""
        return pending.result()

    @torch.inference_mode()
    def forward(self, pairs: list[EncodedPair], groups: list[int] | None) -> list[float]:
        """Raw scores of one sub-batch: the seam `split_on_oom` and engine/faults.py wrap."""
        layout = self._graph_layout(pairs, groups)
        if layout is not None:
            try:
                return self._replay(layout).tolist()
            except torch.OutOfMemoryError:  # `split_on_oom` halves the batch
                raise
            except Exception:  # logged by `_replay`; this batch runs without the graph
                pass
        return self.model(self._pack(pairs, groups)).tolist()

    def _pack(self, pairs: list[EncodedPair], groups: list[int] | None) -> PackedBatch:
        """The batch packed for the uncaptured forward (with the varlen layout if the
        attention kernel reads one)."""
        packed = pack(pairs, groups, self._device, share_prefix=self.share_prefix)
        if self.attention in VARLEN_BACKENDS:
            packed.with_varlen_layout()
        return packed

    # --- CUDA graphs ---------------------------------------------------------------------

    def _wants_graphs(self, mode: str, dtype: torch.dtype, quantized: bool) -> bool:
        """`auto` captures where `compile_policy.CUDA_GRAPHS_MEASURED` says they pay (nowhere
        yet: unmeasured); `on` wherever they can run: CUDA, a model with a bucketed forward
        (`forward_rows`: the Qwen3/Qwen2/Gemma decoders, the BERT/XLM-R
        encoders), a varlen attention kernel; `off` never."""
        check_mode("cuda-graphs", mode, GRAPH_MODES)
        if mode == "off":
            return False
        reason = None
        if self._device.type != "cuda":
            reason = "they run on CUDA only"
        elif not hasattr(self.model, "forward_rows"):
            reason = f"{type(self.model).__name__} has no bucketed forward"
        elif self.attention not in VARLEN_BACKENDS:
            reason = f"they need a varlen attention kernel, not {describe(self.attention)}"
        if reason is not None:
            if mode == "on":
                log.warning("--cuda-graphs on: %s; running without", reason)
            return False
        return mode == "on" or graphs_pay(model_family(self.model), dtype, quantized)

    def enable_graphs(
        self, capture: Capture | None = None, capacity: int = DEFAULT_CAPACITY
    ) -> bool:
        """Replay captured graphs from now on (engine/cuda_graphs.py) if they give the
        uncaptured forward's scores on the probe batch and on the same batch reversed (the
        same bucket, so the second replays the first one's graph with other offsets);
        otherwise log why and keep running without. This is start-up work: it runs before
        the server reports ready. `capture`: CPU tests pass a stand-in."""
        runner = GraphRunner(self.model, self._device, self.share_prefix, capacity, capture)
        pairs, groups = self._probe_batch()
        probes = [(pairs, groups), (pairs[::-1], groups[::-1])]
        started = time.perf_counter()
        self.graphs = None  # the reference: the forward without graphs
        try:
            expected = [s for probe in probes for s in self.forward(*probe)]
            got = [s for p in probes for s in runner.launch(runner.layout(*p)).tolist()]
        except Exception as exc:
            log.warning(
                "CUDA graphs unavailable (%s); running without",
                _reason(exc),
            )
            return False
        worst = scores_disagree(expected, got)
        if worst > self.tolerance:
            log.warning(
                "CUDA graph replays disagree with the forward by %.3g; not using them", worst
            )
            return False
        self.graphs = runner
        log.info(
            "CUDA graphs on: probe captured and replayed in %.1fs (max |Δ| %.2g); each new "
            "batch shape bucket is captured on first use, at most %d kept",
            time.perf_counter() - started,
            worst,
            capacity,
        )
        return True

    def _graph_layout(self, pairs, groups) -> RowLayout | None:
        """The batch's bucketed layout where a CUDA graph will score it, else None (graphs
        off, or no graph place for its bucket: `GraphRunner.admits`)."""
        if self.graphs is None:
            return None
        layout = self.graphs.layout(pairs, groups)
        return layout if self.graphs.offer(layout.bucket) else None

    def _replay(self, layout: RowLayout) -> torch.Tensor:
        """The graph runner's scores for `layout`; raises what fails. Out of memory (while
        capturing, most likely) leaves graphs on but that bucket without one; any other
        failure (a capture that cannot run) turns graphs off for good, logged."""
        try:
            return self.graphs.launch(layout)
        except torch.OutOfMemoryError:
            self.graphs.refuse(layout.bucket)
            log.warning(
                "out of memory on a CUDA graph of %d rows; batches of that shape run "
                "without a graph from now on",
                layout.bucket.rows,
            )
            raise
        except Exception as exc:
            self.graphs = None
            log.warning(
                "CUDA graph failed (%s); running without graphs from now on",
                _reason(exc),
            )
            raise

    def _probe_batch(self) -> tuple[list[EncodedPair], list[int]]:
        """A small seeded batch with shared prefixes, to compare two code paths on."""
        rng = random.Random(0)
        prefix = tuple(rng.randrange(self.vocab_size) for _ in range(40))
        pairs = [
            EncodedPair(
                prefix + tuple(rng.randrange(self.vocab_size) for _ in range(rng.randint(5, 90)))
            )
            for _ in range(6)
        ]
        return pairs, [0, 0, 0, 1, 1, 2]

    def _wants_compile(
        self, mode: str, device: torch.device, dtype: torch.dtype, quantized: bool = False
    ) -> bool:
        """`auto` compiles where it was measured faster: `compile_policy`'s table (CPU class
        × model family × precision, benchmarks/bench_compile.py, docs/benchmarks.md; on CUDA
        `CUDA_MEASURED`); eager where it was not. `on`/`off` force either way, except on
        a model without compiled per-token functions (its `compiles`), which runs eager."""
        check_mode("compile", mode, COMPILE_MODES)
        if not self.model.compiles:
            if mode == "on":
                log.warning("--compile on: %s runs eager only", type(self.model).__name__)
            return False
        return wants_compile(mode, model_family(self.model), dtype, quantized, device)

    def _compile_agrees(self) -> bool:
        """Compile the per-token work (this is the warm-up: it runs before the server
        reports ready) and keep them only if they give the eager scores on a probe batch and
        a second shape (no recompiles later), all finite (`scores_disagree`: a plain
        `|Δ| > tolerance` lets NaN through); any compiler failure (no C++ compiler,
        unsupported op) leaves the eager path on."""
        pairs, groups = self._probe_batch()
        shapes = [(pairs, groups), (pairs[1:5], groups[1:5])]
        started = time.perf_counter()
        try:
            expected = [s for shape in shapes for s in self.forward(*shape)]
            self.use_kernels(self.attention, compiled=True)
            got = [s for shape in shapes for s in self.forward(*shape)]
        except Exception as exc:
            self.use_kernels(self.attention)
            log.warning(
                "torch.compile unavailable (%s); running eager (use --compile off to "
                "skip the attempt)",
                _reason(exc),
            )
            return False
        worst = scores_disagree(expected, got)
        if worst > self.tolerance:
            self.use_kernels(self.attention)
            log.warning(
                "compiled per-token work disagrees with eager by %.3g; running eager", worst
            )
            return False
        log.info(
            "compiled the per-token work in %.1fs (max |Δ| vs eager %.2g)",
            time.perf_counter() - started,
            worst,
        )
        return True

    def _pick_attention(self, mode: str, device: torch.device, dtype: torch.dtype) -> str:
        """`auto`: the first kernel for this device that agrees with SDPA on a probe batch
        (CUDA: fused kernels fastest first, `attention.cuda_backends`) and, on CPU, is also
        measured faster than SDPA here on the model's attention shape (bf16: rerankd's AMX
        kernel, then its AVX512-BF16 one, `attention.cpu_backends`; the AMX kernel was
        2.2-2.9x SDPA per layer on the 0.6B shapes, docs/benchmarks.md). `amx`/`avx512`:
        that kernel whatever its speed, if it loads and agrees. `sdpa`: SDPA."""
        check_mode("attention", mode, ATTENTION_MODES)
        if mode == "sdpa":
            return "sdpa"
        if device.type == "cuda":  # fused kernels only: see `attention.cuda_backends`
            backend = next(filter(self._attention_agrees, cuda_backends()), None)
            if backend is None:
                log.warning(
                    "no fused CUDA attention kernel loaded and agreed with SDPA (each "
                    "refusal is logged above); using per-sequence SDPA, which with a shared "
                    "prefix and GQA runs PyTorch's math kernel: slow"
                )
            return backend or "sdpa"
        cpu_bf16 = device.type == "cpu" and dtype == torch.bfloat16
        if mode == "auto":
            candidates = cpu_backends() if cpu_bf16 else iter(())
            return next((b for b in candidates if self._attention_pays(b)), "sdpa")
        if cpu_bf16 and mode in cpu_backends() and self._attention_agrees(mode):
            return mode
        log.warning(
            "--attention %s: the kernel runs bf16 on CPUs with its instructions only, and "
            "must load and agree with SDPA (this engine: %s on %s); using SDPA",
            mode,
            str(dtype).removeprefix("torch."),
            device.type,
        )
        return "sdpa"

    def _attention_pays(self, backend: str) -> bool:
        """Whether `backend` agrees with SDPA and is faster than it on this CPU, timed on the
        model's attention shape (`ops.attention_speed`)."""
        if not self._attention_agrees(backend):
            return False
        shape = getattr(self.model, "attention_shape", None)
        if shape is None:  # a model that does not say its shape: agreement alone decides
            return True
        speedup = speedup_over_sdpa(backend, shape, torch.bfloat16)
        if speedup < 1.0:
            log.warning(
                "%s attention agrees with SDPA but runs at %.2fx its speed on this CPU; "
                "not using it",
                backend,
                speedup,
            )
            return False
        log.info("%s attention: %.2fx SDPA's speed on this CPU; using it", backend, speedup)
        return True

    def _attention_agrees(self, backend: str) -> bool:
        """Run the probe batch through SDPA and `backend`; True if the scores agree."""
        pairs, groups = self._probe_batch()
        try:
            self.use_kernels("sdpa")
            expected = self.forward(pairs, groups)
            self.use_kernels(backend)  # `forward` also builds the layout `backend` reads
            got = self.forward(pairs, groups)
        except Exception as exc:  # kernel missing, unsupported dtype/head size, ...
            log.warning(
                "%s attention unavailable (%s: %s); trying the next kernel",
                backend,
                type(exc).__name__,
                exc,
            )
            return False
        finally:
            self.use_kernels("sdpa")
        worst = max(abs(a - b) for a, b in zip(expected, got, strict=True))
        if worst > self.tolerance:
            log.warning(
                "%s attention disagrees with SDPA by %.3g; trying the next kernel", backend, worst
            )
            return False
        log.info("%s attention agrees with SDPA (max |Δ| %.2g); using it", backend, worst)
        return True
