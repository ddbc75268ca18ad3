"""Datasets out: a finished job's answers as a fine-tuning set or as OpenAI Batch API files.

    sft           one {"messages": [...request messages, assistant answer]} per row that is ok
                  and finished with `stop` (flags: truncated answers too, every choice, a
                  per-sample `weight` from a column)
    openai-batch  the Batch API's output file ({custom_id, response: {status_code, body}})
                  and, beside it, its error file for the failed rows

Export reads the finished output and, for the requests' messages, the input (through
the job's template, where it has one). It sends no request, and writes its file whole
or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ._exceptions import ConfigError, InputError, StorageError
from ._remote import job_inputs
from ._inputs import InputReader, Row
from ._spec import JobSpec, load_spec
from ._template import Template

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

    def line(self) -> str:
        text = f"{self.written:,} lines to {self.path} ({self.skipped:,} rows left out)"
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
    if spec.output_url:  # from the store, unless the copy here is of the object it holds
        from ._remote import Remote

        Remote(spec.output_url, spec.output).pull(spec.output)
    if not spec.output.is_file():
        raise ConfigError(f"{spec.output}: no output yet; run the job to the end first "
                          f"(batchrun run {spec.name})")
    pairs = _answered_rows(spec)
    if fmt == "sft":
        with _atomic(out) as f:
            written, skipped = _sft(pairs, f, include_truncated=include_truncated, all_choices=all_choices,
                                    weight=weight)
        return ExportSummary(out, written, skipped)
    errors_path = out.with_name(f"{out.name.removesuffix('.jsonl')}.errors.jsonl")
    with _atomic(out) as f, _atomic(errors_path) as errors:
        written, failed = _openai_batch(pairs, f, errors)
    return ExportSummary(out, written, 0, errors_path, failed)


def _answered_rows(spec: JobSpec) -> Iterator[tuple[Row, dict[str, Any]]]:
    """(the row's request, its output row), in order, for every row of the output."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    template = Template(spec.template) if spec.template is not None else None
    with InputReader(job_inputs(spec), endpoint=spec.endpoint, template=template) as reader:
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


def _sft(pairs: Iterator[tuple[Row, dict[str, Any]]], f: IO[str], *, include_truncated: bool,
         all_choices: bool, weight: str | None) -> tuple[int, int]:
    written = skipped = 0
    finishes = ("stop", "length") if include_truncated else ("stop",)
    for row, answer in pairs:
        if answer["status"] != "ok" or row.endpoint not in ("chat", "completions", "responses"):
            skipped += 1
            continue
        if weight is not None and weight not in answer:
            raise ConfigError(f"--weight {weight}: the output has no such column")
        prompt = _messages(row)
        choices = answer.get("choices") if all_choices and answer.get("choices") else [
            {"text": answer["output_text"], "finish_reason": answer["finish_reason"],
             "reasoning_content": answer["reasoning_content"], "tool_calls": answer["tool_calls"]}]
        for choice in choices:
            if choice["finish_reason"] not in finishes:
                skipped += 1
                continue
            assistant: dict[str, Any] = {"role": "assistant", "content": choice["text"] or ""}
            if choice.get("reasoning_content"):
                assistant["reasoning_content"] = choice["reasoning_content"]
            if choice.get("tool_calls"):
                assistant["tool_calls"] = json.loads(choice["tool_calls"])
            sample: dict[str, Any] = {"messages": [*prompt, assistant]}
            if weight is not None:
                sample["weight"] = answer[weight]
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
            written += 1
    return written, skipped


def _messages(row: Row) -> list[dict[str, Any]]:
    body = row.body
    if "messages" in body:
        return list(body["messages"])
    if isinstance(body.get("input"), list):
        return list(body["input"])
    text = body.get("prompt", body.get("input"))
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    return [*messages, {"role": "user", "content": text}]


def _openai_batch(pairs: Iterator[tuple[Row, dict[str, Any]]], out: IO[str], errors: IO[str]) -> tuple[int, int]:
    written = failed = 0
    for row, answer in pairs:
        line = {"id": f"batch_req_{answer['row_index']}", "custom_id": answer["id"]}
        if answer["status"] == "ok":
            line["response"] = {"status_code": 200, "request_id": answer["response_id"],
                                "body": _body(row, answer)}
            line["error"] = None
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += 1
            continue
        found = _STATUS.match(answer["error"] or "")
        if found:
            message = answer["error"][found.end():].lstrip(": ")
            line["response"] = {"status_code": int(found.group(1)), "request_id": None,
                                "body": {"error": {"message": message, "type": None, "code": None}}}
            line["error"] = None
        else:
            line["response"] = None
            line["error"] = {"code": "request_failed", "message": answer["error"]}
        errors.write(json.dumps(line, ensure_ascii=False) + "\n")
        failed += 1
    return written, failed


def _body(row: Row, answer: dict[str, Any]) -> dict[str, Any]:
    """The endpoint's response body, rebuilt from the output's columns."""
    usage: dict[str, Any] = {"prompt_tokens": answer["prompt_tokens"], "completion_tokens": answer["completion_tokens"],
                             "total_tokens": answer["total_tokens"]}
    if answer["cached_tokens"] is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": answer["cached_tokens"]}
    if answer["reasoning_tokens"] is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": answer["reasoning_tokens"]}
    common = {"id": answer["response_id"], "model": answer["model"]}
    if row.endpoint == "embeddings":
        return {"object": "list", "model": answer["model"], "usage": usage,
                "data": [{"object": "embedding", "index": 0, "embedding": answer.get("embedding")}]}
    if row.endpoint == "responses":
        return _response_body(answer)
    choices = answer.get("choices") or [{
        "index": 0, "text": answer["output_text"], "finish_reason": answer["finish_reason"],
        "reasoning_content": answer["reasoning_content"], "tool_calls": answer["tool_calls"],
        "logprobs": answer.get("logprobs")}]
    if row.endpoint == "completions":
        return {**common, "object": "text_completion", "usage": usage, "choices": [
            {"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"],
             "logprobs": _legacy_logprobs(c.get("logprobs"))} for c in choices]}
    body_choices = []
    for c in choices:
        message: dict[str, Any] = {"role": "assistant", "content": c["text"]}
        if c.get("reasoning_content"):
            message["reasoning_content"] = c["reasoning_content"]
        if c.get("tool_calls"):
            message["tool_calls"] = json.loads(c["tool_calls"])
        body_choice: dict[str, Any] = {"index": c["index"], "message": message, "finish_reason": c["finish_reason"]}
        if c.get("logprobs") is not None:
            body_choice["logprobs"] = {"content": c["logprobs"]}
        body_choices.append(body_choice)
    return {**common, "object": "chat.completion", "usage": usage, "choices": body_choices}


def _response_body(answer: dict[str, Any]) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    if answer["reasoning_content"]:
        output.append({"type": "reasoning", "summary": [{"type": "summary_text", "text": answer["reasoning_content"]}]})
    if answer["output_text"] is not None:
        output.append({"type": "message", "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": answer["output_text"], "annotations": []}]})
    for call in json.loads(answer["tool_calls"]) if answer["tool_calls"] else ():
        output.append({"type": "function_call", "call_id": call.get("id"), "name": call["function"].get("name"),
                       "arguments": call["function"].get("arguments")})
    usage: dict[str, Any] = {"input_tokens": answer["prompt_tokens"], "output_tokens": answer["completion_tokens"],
                             "total_tokens": answer["total_tokens"]}
    if answer["cached_tokens"] is not None:
        usage["input_tokens_details"] = {"cached_tokens": answer["cached_tokens"]}
    if answer["reasoning_tokens"] is not None:
        usage["output_tokens_details"] = {"reasoning_tokens": answer["reasoning_tokens"]}
    incomplete = answer["finish_reason"] != "stop"
    return {"id": answer["response_id"], "object": "response", "model": answer["model"],
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens" if answer["finish_reason"] == "length"
                                   else answer["finish_reason"]} if incomplete else None,
            "output": output, "usage": usage}


def _legacy_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"] or []} for e in entries]}


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[IO[str]]:
    """A file written under a temporary name and renamed over `path` once whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{path}: cannot write the export: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
