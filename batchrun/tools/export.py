"""Datasets out: a finished job's answers as a fine-tuning set or as OpenAI Batch API files.

    sft           one {"messages": [...request messages, assistant answer]} per row that is ok
                  and finished with `stop` (flags: truncated answers too, every choice, the
                  answer's `weight`, 0 or 1, from a column)
    openai-batch  the Batch API's output file ({custom_id, response: {status_code, body}})
                  and, beside it, its error file for the failed rows; every body is what
                  the openai SDK's types (ChatCompletion, Completion, Response,
                  CreateEmbeddingResponse) read

Export reads the finished output and, for the requests' messages, the input (through
the job's template, where it has one). It sends no request, and writes its file whole
or not at all.

The output keeps no `created` of the server's: every body says the time the output
file was written (its modification time), so the same output exports to the same file.
Each endpoint rebuilds its own answers (`Endpoint.export_body`) and says whether they
are messages to train on (`Endpoint.answers_with_message`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from .._exceptions import ConfigError, InputError, StorageError
from ..backends.layout import a_shard_state
from ..endpoints import get_endpoint, job_endpoint
from ..inputs.reader import InputReader
from ..inputs.rows import Row
from ..inputs.template import Template
from ..spec.model import JobSpec
from ..spec.parse import load_spec
from ..storage import Store, open_store
from ..storage.durable import private_folder
from ..storage.lock import lock_holder
from ..storage.state import StateStore, state_path

__all__ = ["ExportSummary", "export_job"]

FORMATS = ("sft", "openai-batch")
_STATUS = re.compile(r"HTTP (\d{3})\b")


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    written: int
    skipped: int
    errors_path: Path | None = None
    errors: int = 0
    why: tuple[tuple[str, int], ...] = ()  # what was left out, and how many of each

    def line(self) -> str:
        reasons = "".join(f"{'; ' if i else ': '}{count:,} {what}" for i, (what, count) in enumerate(self.why))
        text = f"{self.written:,} lines to {self.path} ({self.skipped:,} rows left out{reasons})"
        if self.errors_path is not None:
            text += f"; {self.errors:,} failed rows to {self.errors_path}"
        return text


def export_job(job: str | os.PathLike[str] | JobSpec, fmt: str, out: str | os.PathLike[str], *,
               include_truncated: bool = False, all_choices: bool = False,
               weight: str | None = None) -> ExportSummary:
    """Write the finished job's answers to `out` in format `fmt` (see the module's doc)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    spec = job if isinstance(job, JobSpec) else load_spec(job)
    out = Path(out)
    errors_path = out.with_name(f"{out.name.removesuffix('.jsonl')}.errors.jsonl")
    for path in (out, errors_path) if fmt == "openai-batch" else (out,):
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder; name the .jsonl file to write, such as "
                              f"{path / ('train.jsonl' if fmt == 'sft' else 'results.jsonl')}")
    if fmt == "sft" and not job_endpoint(spec.endpoint).answers_with_message:
        raise ConfigError(f"--format sft: a job with endpoint: {spec.endpoint} has no answers to train on; "
                          "export it with --format openai-batch")
    storage = open_store(spec)
    storage.pull_file(spec.output)  # from the store, unless the copy here is of the object it holds
    if not spec.output.is_file():
        raise ConfigError(f"{spec.output}: no output yet; run the job to the end first "
                          f"(batchrun run {spec.name})")
    created = int(spec.output.stat().st_mtime)
    pairs = _answered_rows(spec, storage)
    if fmt == "sft":
        with _atomic(out) as f:
            written, why = _sft(pairs, f, include_truncated=include_truncated, all_choices=all_choices,
                                weight=weight)
        return ExportSummary(out, written, sum(why.values()), why=tuple(why.items()))
    params = {"model": spec.model, **spec.params} if spec.model else dict(spec.params)
    with _atomic(out) as f, _atomic(errors_path) as errors:
        written, failed = _openai_batch(pairs, f, errors, params=params, created=created)
    return ExportSummary(out, written, 0, errors_path, failed)


def _answered_rows(spec: JobSpec, storage: Store) -> Iterator[tuple[Row, dict[str, Any]]]:
    """(the row's request, its output row), in order, for every row of the output."""
    template = Template(spec.template) if spec.template is not None else None
    with InputReader(storage.inputs(), endpoint=spec.endpoint, template=template) as reader:
        _check_made_so(spec, storage, reader.fingerprint())
        rows = reader.rows()
        try:
            output = pq.ParquetFile(spec.output)
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"{spec.output}: cannot read the output: {exc}") from exc
        for batch in output.iter_batches(batch_size=1024):
            for answer in batch.to_pylist():
                row = next(rows, None)
                if row is None or row.index != answer["row_index"]:
                    raise InputError(f"{spec.output}: row {answer['row_index']} has no matching input row; the "
                                     "input changed since the job ran")
                yield row, answer


def _check_made_so(spec: JobSpec, storage: Store, digest: str) -> None:
    """Refuse (exit 2, naming what changed) answers made from another input, template or
    request than the job's now: each would be paired with a prompt it never answered. The
    job's state (its own, or a shard's) says what made them; without one, nothing can."""
    path = state_path(spec.output)
    if not lock_holder(path):  # a run here has the newest
        storage.pull_state(path)
    if not path.exists():  # a job run in shards: one shard's state says it (the parts are its size)
        path = a_shard_state(storage, spec.output) or path
    try:
        store = StateStore.open(path, lock=False)
    except FileNotFoundError:
        return
    try:
        store.check_made_by(digest, spec.request_config(), spec_name=spec.name)
    finally:
        store.close()


def _sft(pairs: Iterator[tuple[Row, dict[str, Any]]], f: IO[str], *, include_truncated: bool,
         all_choices: bool, weight: str | None) -> tuple[int, dict[str, int]]:
    """Lines written, and what was left out: how many, by why."""
    written = 0
    why: dict[str, int] = {}
    finishes = ("stop", "length") if include_truncated else ("stop",)
    for row, answer in pairs:
        if answer["status"] != "ok" or not get_endpoint(row.endpoint).answers_with_message:
            reason = "failed" if answer["status"] != "ok" else "with no message to train on"
            why[reason] = why.get(reason, 0) + 1
            continue
        if weight is not None and weight not in answer:
            raise ConfigError(f"--weight {weight}: the output has no such column")
        prompt = _messages(row)
        choices = answer.get("choices") if all_choices and answer.get("choices") else [
            {"text": answer["output_text"], "finish_reason": answer["finish_reason"],
             "reasoning_content": answer["reasoning_content"], "tool_calls": answer["tool_calls"]}]
        for choice in choices:
            if choice["finish_reason"] not in finishes:
                reason = ("cut at max_tokens (--include-truncated keeps them)" if choice["finish_reason"] == "length"
                          else f"finished with {choice['finish_reason'] or 'no finish_reason'}")
                why[reason] = why.get(reason, 0) + 1
                continue
            assistant: dict[str, Any] = {"role": "assistant", "content": choice["text"] or ""}
            if choice.get("reasoning_content"):
                assistant["reasoning_content"] = choice["reasoning_content"]
            if choice.get("tool_calls"):
                assistant["tool_calls"] = json.loads(choice["tool_calls"])
            if weight is not None:
                assistant["weight"] = _weight(answer, weight)
            f.write(json.dumps({"messages": [*prompt, assistant]}, ensure_ascii=False) + "\n")
            written += 1
    return written, why


def _weight(answer: dict[str, Any], column: str) -> int:
    """The answer's weight in the fine-tuning format: 1 trains on it, 0 does not."""
    value = answer[column]
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return int(value)
    raise ConfigError(f"--weight {column}: row {answer['row_index']} ({answer['id']}) holds {value!r}, but an "
                      "answer's weight is 0 (not trained on) or 1; give a column of 0s and 1s")


def _messages(row: Row) -> list[dict[str, Any]]:
    body = row.body
    if "messages" in body:
        return list(body["messages"])
    if isinstance(body.get("input"), list):
        return list(body["input"])
    text = body.get("prompt", body.get("input"))
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    return [*messages, {"role": "user", "content": text}]


def _openai_batch(pairs: Iterator[tuple[Row, dict[str, Any]]], out: IO[str], errors: IO[str], *,
                  params: Mapping[str, Any], created: int) -> tuple[int, int]:
    written = failed = 0
    for row, answer in pairs:
        line = {"id": f"batch_req_{answer['row_index']}", "custom_id": answer["id"]}
        if answer["status"] == "ok":
            line["response"] = {"status_code": 200, "request_id": answer["response_id"],
                                "body": _body(row, answer, {**params, **row.body}, created)}
            line["error"] = None
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += 1
            continue
        found = _STATUS.match(answer["error"] or "")
        if found:
            status, message = int(found.group(1)), answer["error"][found.end():].lstrip(": ")
            # The output keeps the API's message, not its error type: the type is the status's kind
            kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
            line["response"] = {"status_code": status, "request_id": None,
                                "body": {"error": {"message": message, "type": kind, "param": None, "code": None}}}
            line["error"] = None
        else:
            line["response"] = None
            line["error"] = {"code": "request_failed", "message": answer["error"]}
        errors.write(json.dumps(line, ensure_ascii=False) + "\n")
        failed += 1
    return written, failed


def _body(row: Row, answer: dict[str, Any], request: dict[str, Any], created: int) -> dict[str, Any]:
    """The endpoint's response body, rebuilt from the output's columns; `request` is the
    body as sent (the spec's params, then the row's fields)."""
    return get_endpoint(row.endpoint).export_body(answer, request, model=answer["model"] or request.get("model"),
                                                  created=created)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[IO[str]]:
    """A file written under a temporary name and renamed over `path` once whole."""
    private_folder(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # nothing to resume: the export is written again from the start
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write the export ({exc.strerror or exc}); "
                          "free some space or name another file") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
