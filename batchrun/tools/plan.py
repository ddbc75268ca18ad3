"""`batchrun plan JOB`: what a run would send, and what it could cost, before it sends anything.

The input is validated as a run validates it (templates rendered); the rows a resumed
run would skip are left out; every other row's prompt is counted with the best
tokenizer at hand:

- a Hugging Face `tokenizer.json` the spec names (`tokenizer:`; needs the `tokenizers`
  package: `pip install 'batchrun[tokenizers]'`);
- tiktoken for an OpenAI model, when tiktoken and its encoding are installed;
- otherwise a stated heuristic: UTF-8 bytes / 4, plus 4 tokens a message.

Completion tokens are counted at their worst (max_tokens x n) and, where the state has
answers already, at their mean. Nothing here opens a connection or writes a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from .._exceptions import ConfigError
from .._json import dumps
from ..endpoints import get_endpoint
from ..inputs.reader import InputReader, Row
from ..inputs.template import Template
from ..policy.pricing import Price, completion_bound, usd
from ..spec.parse import JobSpec, load_spec
from ..storage import Store, open_store
from ..storage.lock import lock_holder
from ..storage.state import StateStore, done_rows, state_path

__all__ = ["Plan", "plan_job"]

ASSUMED_LATENCY_S = 2.0  # a request's duration when the state has none measured yet
BATCH = 2048  # prompts counted at once (the tokenizers count a batch in parallel)


@dataclass(frozen=True)
class Plan:
    job: str
    rows: int  # still to do
    rows_total: int
    requests: int
    prompt_tokens: int
    completion_tokens_max: int | None  # None: max_tokens is unset, and the spec states no bound
    completion_tokens_expected: int | None
    cost_usd_max: float | None  # None without prices
    cost_usd_expected: float | None
    duration_s: float
    tokenizer: str  # which counted the prompts
    notes: tuple[str, ...] = ()
    # The same rows through the provider's batch API (`batch_api`): its prices, else half
    batch_cost_usd_max: float | None = None
    batch_cost_usd_expected: float | None = None
    # Every request at the worst case the budget holds it at (its bytes as prompt tokens),
    # which is what an answer that comes without usage is charged
    cost_usd_max_without_usage: float | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data

    def text(self) -> str:
        def number(value: float | None, unit: str = "") -> str:
            return "unknown" if value is None else usd(value) if unit else f"{value:,}"

        lines = [
            f"{self.job}: {self.rows:,} of {self.rows_total:,} rows to do, in {self.requests:,} requests",
            f"  prompt tokens      {self.prompt_tokens:,} ({self.tokenizer})",
            f"  completion tokens  {number(self.completion_tokens_max)} at most, "
            f"{number(self.completion_tokens_expected)} expected",
            f"  cost               {number(self.cost_usd_max, '$')} at most, {number(self.cost_usd_expected, '$')} "
            "expected",
            f"  duration           about {self.duration_s:,.0f} s",
        ]
        if self.batch_cost_usd_max is not None or self.batch_cost_usd_expected is not None:
            lines.insert(4, f"  cost, batch API    {number(self.batch_cost_usd_max, '$')} at most, "
                            f"{number(self.batch_cost_usd_expected, '$')} expected (batch_api: answered within a day)")
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def plan_job(job: str | os.PathLike[str] | JobSpec, *, restart: bool = False) -> Plan:
    """What a run (with `restart`: `run --restart`) would send and could cost. Raises
    as the run would for a spec, input or saved state it would refuse (exit 2)."""
    spec = job if isinstance(job, JobSpec) else load_spec(job)
    storage = open_store(spec)
    template = Template(spec.template) if spec.template is not None else None
    notes: list[str] = []
    with InputReader(storage.inputs(), endpoint=spec.endpoint, require_model=spec.model is None,
                     template=template) as reader:
        digest = reader.fingerprint()
        total, _ = reader.validate()
        done, answered, unmetered = _done(spec, storage, digest, total, restart=restart)
        count, tokenizer = _counter(spec)
        rows, requests, prompt, completion_max, payload = _count(
            spec, (row for row in reader.rows() if not done[row.index]), count)
    grouped = spec.grouped
    if grouped:
        completion_max = 0
    mean_completion, mean_latency = answered
    # (--restart discards what the state saw; failed answers say nothing of a good one's length)
    none = "--restart: no saved answer counts" if restart else "no answer ok in the state yet"
    expected = round(mean_completion * rows) if mean_completion is not None else completion_max
    if mean_completion is None and expected is not None and not grouped:
        # (answers without usage, as llama.cpp streams them, do not say their length)
        learn = "no answer ok with its completion tokens in the state yet" if mean_latency is not None else none
        notes.append(f"{learn} to learn the typical answer length from: expected completion tokens "
                     "are the worst case")
    price = spec.pricing.get(spec.model) if spec.model else None
    if spec.pricing and price is None:
        notes.append(f"model {spec.model!r} has no price in pricing: no cost")
    without_usage = _cost(price, payload, completion_max)
    if without_usage is not None and (unmetered or spec.params.get("stream") is True):
        notes.append(_without_usage(without_usage, unmetered))
    if spec.batch_api is not None:
        notes.append(f"batch_api: the rows go to the provider's batch API, answered within "
                     f"batch_api.max_wait_h ({spec.batch_api.max_wait_h:g} h); the duration is the live path's")
    latency = mean_latency if mean_latency is not None else ASSUMED_LATENCY_S
    if mean_latency is None:
        notes.append(f"duration assumes {ASSUMED_LATENCY_S:g} s a request ({none} to measure)")
    seconds = requests * latency / spec.concurrency
    if spec.rate_limit.requests_per_minute:
        seconds = max(seconds, requests / spec.rate_limit.requests_per_minute * 60)
    if spec.rate_limit.tokens_per_minute:
        seconds = max(seconds, (prompt + (completion_max or 0)) / spec.rate_limit.tokens_per_minute * 60)
    if completion_max is None:
        notes.append("max_tokens is unset: the worst case of completion tokens is unknown; set params.max_tokens "
                     "or budget.assume_max_tokens")
    return Plan(
        job=spec.name, rows=rows, rows_total=total, requests=requests, prompt_tokens=prompt,
        completion_tokens_max=completion_max, completion_tokens_expected=expected,
        cost_usd_max=_cost(price, prompt, completion_max), cost_usd_expected=_cost(price, prompt, expected),
        duration_s=round(seconds, 1), tokenizer=tokenizer, notes=tuple(notes),
        batch_cost_usd_max=_cost(price and price.batched(), prompt, completion_max),
        batch_cost_usd_expected=_cost(price and price.batched(), prompt, expected),
        cost_usd_max_without_usage=without_usage,
    )


def _without_usage(most: float, unmetered: int) -> str:
    """What answers without usage may cost: `most`, the rows' requests at their worst case."""
    seen = "the state has answers that came without usage" if unmetered else \
        "streamed answers may come without usage (llama.cpp's do)"
    return (f"{seen}: such an answer is charged at its worst case, the request's bytes as prompt tokens, so "
            f"these rows could be charged up to {usd(most)}: a budget that must see them through needs that much")


def _cost(price: Price | None, prompt: int, completion: int | None) -> float | None:
    """At these prices, with no prompt token cached (the worst case of the prompt)."""
    if price is None or completion is None:
        return None
    return (prompt * price.input + completion * price.output) / 1e6


def _count(spec: JobSpec, rows: Iterator[Row],
           count: Callable[[list[str]], int]) -> tuple[int, int, int, int | None, int]:
    """The rows, their requests, their prompt tokens, their completion tokens at most
    (None: unbounded, for a row with no max_tokens and no assumed bound), and their
    requests' bytes (a row's own, where several go to a request: a little more than theirs).

    Rows that go several to a request are counted as a run sends them: a worker takes
    `rows_per_request` rows at a time, which go in one request for each set of other
    request fields among them (`Endpoint.group_key`)."""
    n = requests = prompt = completion_max = payload = 0
    bounded = True
    size = spec.rows_per_request
    for batch in _batches(rows, max(size, BATCH - BATCH % size)):  # whole windows of `size` rows
        n += len(batch)
        texts = []
        if spec.grouped:
            endpoint = get_endpoint(batch[0].endpoint)
            requests += sum(len({endpoint.group_key(row.body) for row in batch[at:at + size]})
                            for at in range(0, len(batch), size))
        else:
            requests += len(batch)
        for row in batch:
            body = get_endpoint(row.endpoint).build_body(row.body, spec.model, spec.params)
            payload += len(dumps(body).encode())
            texts.append(_prompt_parts(body))
            most = completion_bound(body, spec.budget.assume_max_tokens)
            if most is None:
                bounded = False
            else:
                completion_max += most
        prompt += sum(count(parts) for parts in texts)
    return n, requests, prompt, completion_max if bounded else None, payload


def _done(spec: JobSpec, storage: Store, digest: str, total: int, *,
          restart: bool) -> tuple[bytearray, tuple[float | None, ...], int]:
    """Rows a resumed run would leave alone, the state's mean completion tokens and
    latency, and its rows answered without usage; nothing when there is no state (or
    `restart`). A state of another input or request shape is refused as a run refuses it."""
    nothing = bytearray(total), (None, None), 0
    if restart:  # a run would discard the state, damaged or not
        return nothing
    path = state_path(spec.output)
    if not lock_holder(path):  # the newest state there is is the job's progress (a run here has it)
        storage.pull_state(path)
    try:
        store = StateStore.open(path, lock=False)
    except FileNotFoundError:
        return nothing
    try:
        saved = store.meta()
        if not saved:  # a state made but never claimed
            return nothing
        # What a run checks, and refuses as it would (exit 2, naming what changed)
        store.check_made_by(digest, spec.request_config(), spec_name=spec.name)
        return done_rows(store.row_states(total)), store.means(), store.spend().unmetered
    finally:
        store.close()


def _batches(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prompt_parts(body: dict[str, Any]) -> list[str]:
    """The texts a request's prompt tokens come from, a message each."""
    parts = []
    for key in ("instructions", "prompt"):
        if isinstance(body.get(key), str):
            parts.append(body[key])
    messages = body.get("messages")
    inputs = body.get("input")
    if isinstance(inputs, str):
        parts.append(inputs)
    elif isinstance(inputs, list):
        messages = inputs
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.append("".join(p.get("text", "") for p in content if isinstance(p, dict)))
    return parts


def _counter(spec: JobSpec) -> tuple[Callable[[list[str]], int], str]:
    """A function counting one request's prompt tokens, and what it is."""
    if spec.tokenizer is not None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("tokenizer: counting with a tokenizer.json needs the tokenizers package: "
                              "pip install 'batchrun[tokenizers]'") from None
        try:
            hf = Tokenizer.from_file(str(spec.tokenizer))
        except Exception as exc:  # the library raises its own Exception for a bad file
            raise ConfigError(f"tokenizer: cannot load {spec.tokenizer}: {exc}") from exc
        return (lambda parts: sum(len(e.ids) for e in hf.encode_batch(parts)) + 4 * len(parts),
                f"tokenizer.json {spec.tokenizer}, plus 4 tokens a message")
    if spec.model:
        try:
            import tiktoken

            encoding = tiktoken.encoding_for_model(spec.model)
        except Exception:  # not installed, not an OpenAI model, or its encoding not downloaded
            encoding = None
        if encoding is not None:
            return (lambda parts: sum(len(encoding.encode(p)) for p in parts) + 4 * len(parts),
                    f"tiktoken {encoding.name}, plus 4 tokens a message")
    return (lambda parts: sum(len(p.encode()) for p in parts) // 4 + 4 * len(parts),
            "heuristic: UTF-8 bytes / 4, plus 4 tokens a message; name a tokenizer.json in the spec for a closer count")
