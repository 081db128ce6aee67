"""`rerankd rerank --ray`: offline reranking of a large JSONL or Parquet dataset on Ray Data.

Same input rows and the same output records as `rerankd rerank` (rerankd/offline.py): each
input row `{"query", "documents", "id"?}` becomes `{"id", "model", "results", "usage"}` or,
for a row that cannot be served, `{"id", "line", "error": {message, type, param}}` (and a
line on stderr); the job goes on. Records are written in input order to a JSONL file, with
the same resume rule: ids already answered in the output are skipped, failed ones retried.

The pipeline:

1. the driver splits the input into chunks (byte ranges of whole lines for JSONL, row
   groups for Parquet) and numbers them, so every row keeps its 1-based line (row) number,
   which is its id when it has none, as in offline.py;
2. read tasks (`flat_map`) turn each chunk into rows `{line, text}` (a Parquet row becomes
   the JSON text of its columns), dropping ids already answered;
3. a pool of model actors (`map_batches` with `ActorPoolStrategy`) scores them: each actor
   loads the model once, with its first row to score (`runtime.build_service`, the serving
   stack of `rerankd serve`), and scores the rows of a batch concurrently, so their pairs
   share engine batches;
4. the driver streams the records back in input order (`preserve_order`) into the output.

Paths may be local (on a filesystem every node sees) or any URI pyarrow opens (s3://, gs://…).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rerankd.settings import Settings

#: rows per read chunk: small enough to spread a file over the actors early
ROWS_PER_CHUNK = 512


@dataclass
class DataOptions:
    """The actor pool and its batches."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: rows handed to one actor call; they are scored concurrently
    batch_size: int = 16
    rows_per_chunk: int = ROWS_PER_CHUNK

    def pool(self) -> tuple[int, int]:
        """(min, max) actors."""
        if self.min_replicas is None and self.max_replicas is None:
            return self.replicas, self.replicas
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        return max(1, low), max(1, low, high)

    def validate(self) -> None:
        low, high = self.pool()
        if self.replicas < 1 or low > high:
            raise ValueError("need --replicas >= 1 and --min-replicas <= --max-replicas")
        if self.batch_size < 1 or self.rows_per_chunk < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("--num-cpus-per-replica and --num-gpus-per-replica must be >= 0")


# --- input: chunks that keep line numbers --------------------------------------------------


def _filesystem(uri: str):
    """(pyarrow filesystem, path) for a local path or a URI."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return fs.FileSystem.from_uri(uri)


def is_parquet(uri: str) -> bool:
    """Parquet for *.parquet files and for directories (of *.parquet files); else JSONL."""
    from pyarrow import fs

    filesystem, path = _filesystem(uri)
    info = filesystem.get_file_info(path)
    return info.type == fs.FileType.Directory or path.endswith((".parquet", ".pq"))


def _parquet_files(filesystem, path: str) -> list[str]:
    from pyarrow import fs

    if filesystem.get_file_info(path).type != fs.FileType.Directory:
        return [path]
    infos = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
    return sorted(
        i.path for i in infos if i.type == fs.FileType.File and i.path.endswith((".parquet", ".pq"))
    )


def plan_chunks(uri: str, rows_per_chunk: int = ROWS_PER_CHUNK) -> list[dict[str, Any]]:
    """The input as chunks `{uri, kind, start, end | row_group, first_line}`, in order.

    JSONL: one pass over the bytes finds line boundaries (every line counts, blank ones
    too, as offline.py numbers them). Parquet: row groups, numbered across files in name
    order.
    """
    filesystem, path = _filesystem(uri)
    chunks: list[dict[str, Any]] = []
    if is_parquet(uri):
        import pyarrow.parquet as pq

        first = 0
        for file in _parquet_files(filesystem, path):
            with filesystem.open_input_file(file) as f:
                meta = pq.ParquetFile(f).metadata
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                chunks.append(
                    {"uri": uri, "file": file, "kind": "parquet", "row_group": group,
                     "start": 0, "end": 0, "first_line": first + 1}
                )  # fmt: skip
                first += rows
        return chunks
    offset = start = 0
    line = first_line = 1
    in_chunk = 0
    with filesystem.open_input_stream(path) as f:
        for raw in _lines(f):
            offset += len(raw)
            in_chunk += 1
            line += 1
            if in_chunk >= rows_per_chunk:
                chunks.append(_jsonl_chunk(uri, path, start, offset, first_line))
                start, first_line, in_chunk = offset, line, 0
    if in_chunk:
        chunks.append(_jsonl_chunk(uri, path, start, offset, first_line))
    return chunks


def _jsonl_chunk(uri: str, file: str, start: int, end: int, first_line: int) -> dict[str, Any]:
    return {"uri": uri, "file": file, "kind": "jsonl", "row_group": 0, "start": start,
            "end": end, "first_line": first_line}  # fmt: skip


def _lines(stream, block: int = 1 << 20):
    """Raw lines (with their b"\\n") of a binary stream."""
    rest = b""
    while True:
        data = stream.read(block)
        if not data:
            break
        parts = (rest + data).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part + b"\n"
    if rest:
        yield rest


def read_chunk(chunk: dict[str, Any], done: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Rows `{line, text, skip}` of one chunk; `skip` for ids already in the output."""
    from rerankd.offline import _key, parse_line

    filesystem, _ = _filesystem(chunk["uri"])
    if chunk["kind"] == "parquet":
        import pyarrow.parquet as pq

        with filesystem.open_input_file(chunk["file"]) as f:
            rows = pq.ParquetFile(f).read_row_group(chunk["row_group"]).to_pylist()
        texts = []
        for row in rows:
            if row.get("id") is None:
                row.pop("id", None)  # a null id: numbered like a JSONL line without one
            texts.append(json.dumps(row, ensure_ascii=False, default=str))
    else:
        with filesystem.open_input_file(chunk["file"]) as f:
            f.seek(chunk["start"])
            data = f.read(chunk["end"] - chunk["start"])
        texts = [t.decode("utf-8", "replace") for t in data.split(b"\n")]
        if data.endswith(b"\n"):
            texts.pop()
    out = []
    for number, text in enumerate(texts, start=chunk["first_line"]):
        if not text.strip():
            continue  # blank lines are counted, never scored (offline.py)
        skip = False
        if done:
            job = parse_line(text, number)
            skip = job.error is None and _key(job.id) in done
        out.append({"line": number, "text": text, "skip": skip})
    return out


# --- the model actors -----------------------------------------------------------------------


class Scorer:
    """One actor of the pool: the model, loaded once, scoring batches of rows."""

    def __init__(
        self,
        settings: Settings,
        top_n: int | None,
        instruction: str | None,
        return_documents: bool,
        concurrency: int,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.settings = settings
        self.backend: Any = None  # loaded with the first row to score: a resumed job whose
        # rows are all answered already never loads the model
        self.top_n, self.instruction = top_n, instruction
        self.return_documents = return_documents
        self.concurrency = max(1, concurrency)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        lines = [int(x) for x in batch["line"]]
        texts = [str(x) for x in batch["text"]]
        skips = [bool(x) for x in batch["skip"]]
        results = self.loop.run_until_complete(self._score_all(lines, texts, skips))
        status, records, documents = zip(*results, strict=True) if results else ((), (), ())
        return {
            "line": np.asarray(lines, dtype=np.int64),
            "status": np.asarray(status, dtype=object),
            "record": np.asarray(records, dtype=object),
            "documents": np.asarray(documents, dtype=np.int64),
        }

    async def _score_all(self, lines, texts, skips) -> list[tuple[str, str, int]]:
        from rerankd.offline import LocalBackend

        if self.backend is None and not all(skips):
            self.backend = await LocalBackend.open(self.settings)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(line: int, text: str, skip: bool) -> tuple[str, str, int]:
            from rerankd.offline import LineError, error_record, parse_line

            if skip:
                return "skipped", "", 0
            job = parse_line(text, line)
            if job.error is not None:
                return "failed", _dump(error_record(job, job.error)), 0
            async with gate:
                try:
                    got = await self.backend.rerank(
                        job.query, job.documents or [], self.top_n, self.instruction,
                        self.return_documents,
                    )  # fmt: skip
                except LineError as exc:
                    return "failed", _dump(error_record(job, exc)), 0
            return "scored", _dump({"id": job.id, **got}), job.size

        return await asyncio.gather(*(one(*row) for row in zip(lines, texts, skips, strict=True)))


def _dump(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)  # exactly as offline.py writes a line


# --- the job --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scoring:
    """What the job asks of every line (offline.py's run options): the same in each actor."""

    top_n: int | None = None
    instruction: str | None = None
    return_documents: bool = True
    #: lines in flight at once in one actor
    concurrency: int = 4


def build_dataset(
    input_uri: str,
    settings: Settings,
    options: DataOptions,
    scoring: Scoring = Scoring(),
    done: frozenset[str] = frozenset(),
):
    """The lazy Ray Dataset of output rows `{line, status, record, documents}` in input order."""
    import ray.data

    options.validate()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    chunks = plan_chunks(input_uri, options.rows_per_chunk)
    if not chunks:
        return None
    low, high = options.pool()
    return (
        ray.data.from_items(chunks, override_num_blocks=len(chunks))
        .flat_map(read_chunk, fn_kwargs={"done": done})
        .map_batches(
            Scorer,
            batch_size=options.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus,
            fn_constructor_kwargs={
                **asdict(scoring),
                "settings": settings,
                "concurrency": max(scoring.concurrency, options.batch_size),
            },
        )
    )


def run(
    input_uri: str,
    output_path: Path,
    settings: Settings,
    options: DataOptions,
    scoring: Scoring = Scoring(),
    progress: bool | None = None,
):
    """Rerank `input_uri` into `output_path` (appending, resumable) on the Ray cluster this
    process is connected to (or a local one). Returns offline.py's Summary."""
    import ray.data

    from rerankd.offline import Summary, load_done

    if not ray.is_initialized():
        ray.init(logging_level="WARNING")
    context = ray.data.DataContext.get_current()
    if progress is not None:
        context.enable_progress_bars = progress
    done = frozenset(load_done(output_path))
    summary = Summary()
    started = time.perf_counter()
    dataset = build_dataset(input_uri, settings, options, scoring, done)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    source = input_uri.rstrip("/").rsplit("/", 1)[-1]  # as offline.py names the input
    last_line = 0
    with open(output_path, "a", encoding="utf-8") as out:
        for row in dataset.iter_rows() if dataset is not None else ():
            line = int(row["line"])
            if line <= last_line:  # preserve_order guarantees this; never write out of order
                raise RuntimeError(f"Ray Data returned line {line} after line {last_line}")
            last_line = line
            status = row["status"]
            if status == "skipped":
                summary.skipped += 1
                continue
            if status == "scored":
                summary.scored += 1
                summary.documents += int(row["documents"])
            else:
                summary.failed += 1
                error = json.loads(row["record"])["error"]["message"]
                print(f"rerankd rerank: {source}:{line}: {error}", file=sys.stderr)
            out.write(row["record"] + "\n")
            out.flush()
    summary.seconds = time.perf_counter() - started
    return summary


def main(
    input_uri: str,
    output_path: Path,
    settings: Settings,
    options: DataOptions,
    progress: bool | None = None,
    **scoring: Any,
) -> int:
    """`rerankd rerank --ray`: exit code 0, 1 (some rows failed) or 2 (the job could not run).

    `scoring`: the fields of `Scoring` (top_n, instruction, return_documents, concurrency)."""
    from rerankd.offline import summary_line
    from rerankd.ray import require_ray

    try:
        require_ray()
        options.validate()
        summary = run(input_uri, output_path, settings, options, Scoring(**scoring), progress)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"rerankd rerank --ray: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a Ray error, e.g. the model actors could not start
        text = str(exc)
        fatal = [line for line in text.splitlines() if "FatalError: " in line]
        reason = fatal[-1].split("FatalError: ", 1)[1] if fatal else f"{type(exc).__name__}: {text}"
        print(f"rerankd rerank --ray: the job failed: {reason}", file=sys.stderr)
        return 2
    low, high = options.pool()
    actors = f"{low} model actors" if low == high else f"{low}..{high} model actors"
    print(summary_line(summary, output_path, [actors]), file=sys.stderr)
    return 1 if summary.failed else 0
