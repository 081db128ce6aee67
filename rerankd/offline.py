"""Offline batch reranking: a JSONL file of queries in, a JSONL file of rankings out.

Each input line is `{"query", "documents", "id": optional}` with the query and documents in
any form POST /v1/rerank takes (text, and for a multimodal model the image forms: vLLM's
`{"content": [...]}`, Jina's `{"image": ...}`), parsed by the same code; each
output line is `{"id", "model", "results", "usage"}` with `results` shaped exactly as
POST /v1/rerank shapes them, or `{"id", "line", "error": {message, type, param}}` for a
line that could not be served (the run goes on). Lines without an `id` get their 1-based
line number. Output is written in input order and flushed line by line, so an interrupted
run resumes where it stopped: ids already answered are skipped, failed ones are retried.

Scoring runs in this process (the same service the server uses, so several lines in flight
share engine batches) or on a running server through `rerankd.client`. This module knows
neither HTTP routes nor tensors.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rerankd.api.documents import document_inputs, input_text, query_input
from rerankd.api.errors import error_type
from rerankd.api.responses import rerank_results, usage
from rerankd.errors import InvalidRequest, RerankdError


class FatalError(Exception):
    """Nothing more can be scored (server unreachable, bad key, unknown model): stop the run."""


class LineError(Exception):
    """This line cannot be scored; recorded in the output, and the run goes on."""

    def __init__(self, message: str, type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.message, self.type, self.param = message, type, param


# --- backends ----------------------------------------------------------------------------


class Backend(Protocol):
    model: str

    async def rerank(
        self,
        query: str | dict[str, Any],
        documents: list[str | dict[str, Any]] | dict[str, Any],
        top_n: int | None,
        instruction: str | None,
        return_documents: bool,
    ) -> dict[str, Any]:
        """`{"model", "results", "usage"}` as /v1/rerank answers; raises LineError/FatalError."""
        ...

    async def close(self) -> None: ...


class LocalBackend:
    """The serving stack in this process: Settings → build_service → service.rerank."""

    def __init__(self, service: Any) -> None:
        self._service = service
        self.model = service.resolve(None).name

    @classmethod
    async def open(cls, settings: Any) -> LocalBackend:
        from rerankd.runtime import build_service  # torch lives behind this import

        try:
            service = await asyncio.to_thread(build_service, settings)
        except RerankdError as exc:
            raise FatalError(f"cannot load {settings.model!r}: {exc.message}") from exc
        await service.start()
        return cls(service)

    async def rerank(self, query, documents, top_n, instruction, return_documents):
        try:  # as POST /v1/rerank reads them (rerankd/api/routes.py)
            inputs, sent = document_inputs(documents)
            ranking = await self._service.rank_documents(
                None, query_input(query), inputs, instruction, top_n=top_n
            )
        except RerankdError as exc:
            raise LineError(exc.message, error_type(exc), exc.param) from exc
        texts = [input_text(item) for item in inputs]
        results = rerank_results(ranking, sent, texts, return_documents)
        return {"model": ranking.model, "results": results, "usage": usage(ranking)}

    async def close(self) -> None:
        await self._service.stop()


class RemoteBackend:
    """A running rerankd (or compatible) server, through the async client (with retries)."""

    def __init__(self, client: Any, model: str | None) -> None:
        self._client = client
        self.model = model or ""

    @classmethod
    async def open(
        cls, url: str, api_key: str | None = None, model: str | None = None
    ) -> RemoteBackend:
        from rerankd import client as rc

        client = rc.AsyncClient(url, api_key=api_key, timeout=600)
        try:
            models = await client.models()
        except (rc.APIError, rc.APIConnectionError) as exc:
            await client.aclose()
            raise FatalError(f"cannot use the server at {url}: {exc}") from exc
        names = {n for m in models for n in (m.id, *m.aliases)}
        if model and model not in names:
            await client.aclose()
            served = ", ".join(m.id for m in models)
            raise FatalError(f"model {model!r} is not served at {url}; available: {served}")
        return cls(client, model or (models[0].id if models else None))

    async def rerank(self, query, documents, top_n, instruction, return_documents):
        from rerankd import client as rc

        # vLLM's documents object goes as it is (the client's `documents` is a list)
        whole = {"documents": documents} if isinstance(documents, dict) else None
        try:
            got = await self._client.rerank(
                query,
                [] if whole else documents,
                top_n,
                instruction,
                self.model or None,
                return_documents,
                extra=whole,
            )
        except (rc.AuthenticationError, rc.NotFoundError, rc.APIConnectionError) as exc:
            raise FatalError(str(exc)) from exc
        except rc.APIError as exc:
            raise LineError(exc.message, exc.type or "Error", exc.param) from exc
        raw = got.raw
        return {"model": raw.get("model"), "results": raw["results"], "usage": raw.get("usage")}

    async def close(self) -> None:
        await self._client.aclose()


# --- input and output --------------------------------------------------------------------


@dataclass
class Job:
    """One input line, parsed and validated (or the error that makes it unservable)."""

    line: int
    id: Any
    query: str | dict[str, Any] = ""
    #: as sent: a list, or vLLM's {"content": [...]} (one document per part)
    documents: list[Any] | dict[str, Any] | None = None
    error: LineError | None = None

    @property
    def size(self) -> int:
        """How many documents the line holds."""
        if isinstance(self.documents, dict):
            return len(self.documents.get("content") or ())
        return len(self.documents or ())


def _key(id_: Any) -> str:
    """Ids compare as JSON values: 3 and "3" are different ids."""
    return json.dumps(id_, sort_keys=True)


_DOCUMENTS_FORM = (
    '`documents` must be a list (or vLLM\'s {"content": [...]}, one part per document)'
)


def parse_line(text: str, line: int) -> Job:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Job(line, line, error=LineError(f"not valid JSON: {exc}"))
    if not isinstance(data, dict):
        return Job(
            line, line, error=LineError(f"expected a JSON object, got {type(data).__name__}")
        )
    id_ = data.get("id", line)
    if not isinstance(id_, (str, int)) or isinstance(id_, bool):
        return Job(line, line, error=LineError("`id` must be a string or an integer", param="id"))
    query, documents = data.get("query"), data.get("documents")
    if not isinstance(query, (str, dict)):
        return Job(
            line,
            id_,
            error=LineError(
                '`query` must be a string (or {"content": [...]} / {"image": ...})', param="query"
            ),
        )
    if not isinstance(documents, (list, dict)):
        return Job(line, id_, error=LineError(_DOCUMENTS_FORM, param="documents"))
    try:  # same checks, and messages, as the server's (images are decoded when scored)
        query_input(query)
        document_inputs(documents)
    except InvalidRequest as exc:
        return Job(line, id_, error=LineError(exc.message, param=exc.param))
    return Job(line, id_, query, documents)


def read_jobs(path: Path) -> Iterator[Job]:
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield parse_line(text, number)


def count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for text in f if text.strip())


def load_done(path: Path) -> set[str]:
    """Keys of ids already answered in `path`. Error records and a torn last line (an
    interrupted write) are dropped from the file, so that retried lines appear once."""
    if not path.exists():
        return set()
    done: set[str] = set()
    keep: list[str] = []
    dropped = False
    with open(path, encoding="utf-8") as f:
        for text in f:
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                dropped = dropped or bool(text.strip())
                continue
            if isinstance(record, dict) and "id" in record and "error" not in record:
                done.add(_key(record["id"]))
                keep.append(text if text.endswith("\n") else text + "\n")
            else:
                dropped = True
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)
    return done


# --- the run -----------------------------------------------------------------------------


@dataclass
class Summary:
    scored: int = 0
    skipped: int = 0
    failed: int = 0
    documents: int = 0
    seconds: float = 0.0


def error_record(job: Job, error: LineError) -> dict[str, Any]:
    """The output line of an input line that could not be served (this job's and Ray's)."""
    body = {"message": error.message, "type": error.type, "param": error.param}
    return {"id": job.id, "line": job.line, "error": body}


def _report(job: Job, error: LineError, source: str) -> dict[str, Any]:
    print(f"rerankd rerank: {source}:{job.line}: {error.message}", file=sys.stderr)
    return error_record(job, error)


async def run(
    backend: Backend,
    input_path: Path,
    output_path: Path,
    top_n: int | None = None,
    instruction: str | None = None,
    return_documents: bool = True,
    concurrency: int = 4,
    progress: bool | None = None,
) -> Summary:
    """Rerank every line of `input_path` not yet in `output_path`, appending to it.

    Up to `concurrency` lines are in flight at once (the scheduler merges their pairs into
    shared batches); results are still written in input order. `progress`: None → a bar
    on a terminal only.
    """
    from tqdm import tqdm

    done = load_done(output_path)
    summary = Summary()
    started = time.perf_counter()
    bar = tqdm(
        total=count_lines(input_path),
        unit="query",
        disable=None if progress is None else not progress,
    )
    pending: deque[tuple[Job, asyncio.Task | None]] = deque()

    async def score(job: Job) -> dict[str, Any]:
        got = await backend.rerank(
            job.query, job.documents or [], top_n, instruction, return_documents
        )
        return {"id": job.id, **got}

    async def finish_one(out) -> None:
        job, task = pending.popleft()
        record = await _outcome(job, task, summary, input_path.name)
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        bar.update(1)
        elapsed = time.perf_counter() - started
        bar.set_postfix_str(f"{summary.documents / max(elapsed, 1e-9):.1f} docs/s")

    output_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(output_path, "a", encoding="utf-8") as out:
            for job in read_jobs(input_path):
                if job.error is None and _key(job.id) in done:
                    summary.skipped += 1
                    bar.update(1)
                    continue
                task = None if job.error else asyncio.ensure_future(score(job))
                pending.append((job, task))
                while len(pending) >= max(1, concurrency):
                    await finish_one(out)
            while pending:
                await finish_one(out)
    finally:
        for _, task in pending:
            if task is not None:
                task.cancel()
        bar.close()
    summary.seconds = time.perf_counter() - started
    return summary


async def _outcome(job: Job, task: asyncio.Task | None, summary: Summary, source: str) -> dict:
    """The output record of a line (its result, or the error it met), counted in `summary`."""
    if task is None:  # the line itself was bad (see `read_jobs`)
        assert job.error is not None
        summary.failed += 1
        return _report(job, job.error, source)
    try:
        record = await task
    except LineError as exc:
        summary.failed += 1
        return _report(job, exc, source)
    summary.scored += 1
    summary.documents += job.size
    return record


async def rerank_file(open_backend, input_path: Path, output_path: Path, **options: Any) -> Summary:
    """Open a backend (an awaitable factory), run, close it."""
    backend = await open_backend()
    try:
        return await run(backend, input_path, output_path, **options)
    finally:
        await backend.close()


def summary_line(summary: Summary, output: Path, extra: Sequence[str] = ()) -> str:
    parts = [
        f"{summary.scored} scored",
        f"{summary.skipped} skipped (already in {output.name})",
        f"{summary.failed} failed",
        f"{summary.documents / max(summary.seconds, 1e-9):.1f} docs/s",
        *extra,
    ]
    return "rerankd rerank: " + ", ".join(parts)
