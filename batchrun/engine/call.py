"""A row's call: cache, budget, request, structured re-ask, charge, the key kept out.

    row ─▶ body (its endpoint) ─▶ cached answer? ─▶ hold its worst case against the budget
        ─▶ Client.send (the request with its retries) ─▶ re-ask while the answer breaks the
        schema ─▶ charge every answer paid for, let go of the hold ─▶ scrub an echoed key

Rows of a `grouped` endpoint go several to a request (`call_group`): the endpoint
builds the one body and splits the one answer among the rows (`Endpoint.split`).

The budget's holds (`engine.holds`) are recorded in the state before their request
goes, by the `HoldLog` the caller passes in (the run's writer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .._exceptions import APIError, BudgetReached, JobFatalAPIError
from ..endpoints import get_endpoint
from ..endpoints.result import Result, map_texts
from ..http.client import Client, Deferred, Request, Unsendable
from ..inputs.reader import Row
from ..policy.pricing import Budget, Hold, Price, cost
from ..spec.model import JobSpec
from ..spec.schema import Structure
from .cache import ResponseCache, cacheable, from_cache
from .holds import Crowded, HoldLog, Holds, Worst

__all__ = ["Caller", "HoldLog"]

# A request refused for what it holds (not an answer we cannot read, nor a route or model
# the server does not have: a 404 is the same for every half of the group)
_REFUSED = re.compile(r"HTTP (?:400|413|422): ")
_UNBOUNDED = ("not sent: its max_tokens, n or best_of is no whole number, so the budget cannot hold what its "
              "answer may cost; give it one (for max_tokens, budget.assume_max_tokens may stand in)")


class Caller:
    """Answers rows; use as `async with Caller(...) as caller`. `cache`: the run's response
    cache, if the spec names one; `budget`: the job's, with what earlier runs spent, and
    `hold_log`, where its holds are recorded before their request goes."""

    def __init__(self, spec: JobSpec, client: Client, *, cache: ResponseCache | None = None,
                 budget: Budget | None = None, hold_log: HoldLog | None = None) -> None:
        self.spec = spec
        self.client = client
        self.cache = cache
        self.holds = Holds(spec, budget, hold_log)
        self.cache_hits = 0
        self.uncacheable = 0  # requests the cache may not answer: not deterministic
        self.short_choices = 0  # answers with fewer choices than their request's n (a server that ignores n)
        self.reached: BudgetReached | None = None  # a row's retry the budget could not hold: the job stops
        schema = spec.answer_schema()
        self._structure = Structure(schema) if schema is not None else None

    @property
    def budget(self) -> Budget | None:
        return self.holds.budget

    @property
    def requests_sent(self) -> int:
        return self.client.requests_sent

    async def __aenter__(self) -> Caller:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.client.__aexit__(*exc_info)

    def stop_holding(self) -> None:
        """The job is stopping: requests waiting for the budget give up rather than go, and
        a failed attempt is not sent again (the requests in flight finish)."""
        self.holds.stop()
        self.client.stopping = True

    async def call(self, row: Row, *, park: bool = False, pushed_back: bool = False,
                   spent: tuple[int, int] = (0, 0)) -> Result:
        """Answer one row, retrying what is worth retrying; a failure is a failed Result.

        Raises JobFatalAPIError when the API refuses the job as a whole, and Deferred
        with `park` (see `Client.send`). `pushed_back`: the row met a 429 before (it was
        set aside), so it never probes; `spent`: the failures and 429s it met then.
        """
        endpoint = get_endpoint(row.endpoint)
        body = endpoint.build_body(row.body, self.spec.model, self.spec.params)
        try:
            request = self.client.request(row.endpoint, body, pushed_back=pushed_back, spent=spent)
        except Unsendable as exc:
            # Validation refuses such rows before any request; should one slip through,
            # it fails alone rather than stopping the job.
            return Result(row.index, row.id, "failed", error=str(exc))
        price = self._price(body)
        key = self._cache_key(request, body)
        if key is not None and (hit := self.cache.get(key)) is not None:  # type: ignore[union-attr]
            return self._from_cache(row, hit, price, request.payload)
        worst = self.holds.worst(price, body, len(request.payload), generates=endpoint.generates)
        if worst is not None and worst.tokens is None and self.holds.budget is not None:
            # (validation refuses such rows; one validated before the spec had a budget may come)
            return Result(row.index, row.id, "failed", error=_UNBOUNDED)
        # Re-asks may follow the first answer: all of them are held against the budget.
        held = _UNHELD if worst is None else \
            await _Held.take(self.holds, request, worst, 1 + (self.spec.retry.max_reasks if self._structure else 0))
        try:
            result = await self._send(row, request, park=park)  # (nothing is paid before its answer)
        except (Deferred, JobFatalAPIError):  # no answer to save: none was paid but those lost
            if request.lost:
                await held.count_lost()
            self.holds.let_go(held.hold)
            raise
        paid = [result] if result.status == "ok" else []
        if held.hold is not None:
            held.paid = bool(paid)
        if result.status == "ok" and type(asked := body.get("n")) is int and asked > 1 and \
                len((result.extra or {}).get("choices") or (None,)) < asked:
            self.short_choices += 1
        if self._structure is not None and result.status == "ok":
            result, paid = await self._validated(row, request, result)
        if request.lost:
            await held.count_lost()  # the last attempt's, if lost: no other follows
        if self.client.echoed_key is not None:
            self._scrub(result)
        if self.spec.keep_request:
            result.extra = {**(result.extra or {}), "request": request.payload.decode()}
        self.holds.charge(result, paid, price, worst, held.hold, generates=endpoint.generates)
        self.reached = self.reached or held.reached
        if key is not None and result.status == "ok":
            result.cache_key = key  # cached by the writer, once the state has it
        return result

    def _price(self, body: Mapping[str, Any]) -> Price | None:
        return self.spec.pricing.get(body.get("model")) if self.spec.pricing else None

    def _cache_key(self, request: Request, body: Mapping[str, Any]) -> str | None:
        """The request's key in the cache, when there is one and it may answer this request."""
        if self.cache is None:
            return None
        if not cacheable(body, everything=self.cache.spec.everything):
            self.uncacheable += 1
            return None
        return self.cache.key(str(request.url), body)

    def _from_cache(self, row: Row, hit: Result, price: Price | None, payload: bytes) -> Result:
        self.cache_hits += 1
        return from_cache(hit, row.index, row.id, price, payload if self.spec.keep_request else None)

    async def _send(self, row: Row, request: Request, *, park: bool = False) -> Result:
        result = await self.client.send(request, park=park)
        result.row_index, result.id = row.index, row.id
        return result

    async def _validated(self, row: Row, request: Request, result: Result) -> tuple[Result, list[Result]]:
        """Ask again while the answer is not JSON valid against the schema, at most
        `retry.max_reasks` times. Every answer was paid for: they come back beside the
        row's result, and its usage columns add them up (see `Holds.charge`)."""
        assert self._structure is not None
        paid = [result]
        while True:
            parsed, problem = self._structure.problem(result.output_text)
            if problem is None:
                result.extra = {**(result.extra or {}), "parsed": parsed}
                break
            if len(paid) > self.spec.retry.max_reasks:
                if result.finish_reason == "length":
                    problem += "; the answer was cut at max_tokens: allow more tokens"
                result = Result(row.index, row.id, "failed", attempts=request.count, latency_s=request.latency,
                                error=self.client.error_text(problem), model=result.model,
                                response_id=result.response_id, finish_reason=result.finish_reason,
                                output_text=result.output_text)
                break
            result = await self._send(row, request)
            if result.status != "ok":
                break
            paid.append(result)
        return result, paid

    def _scrub(self, result: Result) -> None:
        """A server that echoes the key inside an answer must not put it in the state or
        the output: an exact look per text (cheap); where it is found, every piece of the
        key goes from every text of the answer."""
        key, redact = self.client.echoed_key, self.client.redact
        assert key is not None
        if key not in (result.output_text or "") and key not in (result.reasoning_content or "") \
                and key not in (result.tool_calls or "") and not _holds(result.extra, key):
            return
        for name in ("output_text", "reasoning_content", "tool_calls"):
            if (text := getattr(result, name)) is not None:
                setattr(result, name, redact(text))
        if result.extra is not None:
            result.extra = map_texts(result.extra, redact)

    # -- several rows to a request ---------------------------------------------------------

    async def call_group(self, rows: list[Row]) -> list[Result]:
        """Answer rows that go several to a request (a `grouped` endpoint): rows whose other
        request fields agree go in one. A request refused (4xx) for its content is split in
        halves until the row it is about fails alone, with the API's message."""
        endpoint = get_endpoint(rows[0].endpoint)
        groups: dict[str, list[Row]] = {}
        for row in rows:
            groups.setdefault(endpoint.group_key(row.body), []).append(row)
        results: list[Result] = []
        for group in groups.values():
            results += await self._group(group, 0)
        return results

    async def _group(self, rows: list[Row], before: int) -> list[Result]:
        """`before`: requests these rows were already part of (the halves of a refused one)."""
        endpoint = get_endpoint(rows[0].endpoint)
        field = endpoint.field
        rest = {k: v for k, v in rows[0].body.items() if k != field}
        body = endpoint.build_group_body([row.body[field] for row in rows], rest, self.spec.model, self.spec.params)
        # Each row's part of the request, by the length of what it asks: its part of the usage
        weights = [len(str(row.body[field])) for row in rows]
        try:
            request = self.client.request(endpoint.name, body, tokens=sum(weights) // 4 + len(rows))
        except Unsendable as exc:
            return [Result(r.index, r.id, "failed", error=str(exc)) for r in rows]
        price = self._price(body)
        worst = self.holds.worst(price, {}, len(request.payload), generates=endpoint.generates)
        held = await _Held.take(self.holds, request, worst, 1)
        try:
            answer = await self._send(rows[0], request)
        except JobFatalAPIError:
            if request.lost:
                await held.count_lost()
            self.holds.let_go(held.hold)
            raise
        if request.lost:
            await held.count_lost()
            self.reached = self.reached or held.reached
        hold = held.hold
        paid = [answer] if answer.status == "ok" else []
        # the request's cost; its hold goes with the rows
        self.holds.charge(answer, paid, price, worst, hold, generates=endpoint.generates)
        attempts = before + request.count
        if answer.status != "ok" and len(rows) > 1 and _REFUSED.match(answer.error or ""):
            # Refused for what it holds (nothing paid): find the row, in halves
            self.holds.forget(hold)
            half = len(rows) // 2
            return await self._group(rows[:half], attempts) + await self._group(rows[half:], attempts)
        results = self._parts(rows, answer, weights, price, attempts)
        self.holds.split_cost(results, answer, weights, paid=bool(paid))
        return results

    def _parts(self, rows: list[Row], answer: Result, weights: list[int], price: Price | None,
               attempts: int) -> list[Result]:
        """Each row's Result from the one answer: its part as the endpoint splits it, or the
        answer's failure."""
        error = answer.error
        if answer.status == "ok":
            try:
                parts = get_endpoint(rows[0].endpoint).split(answer, weights)
            except APIError as exc:
                error = str(exc)
            else:
                for row, part in zip(rows, parts):
                    part.row_index, part.id, part.attempts, part.latency_s = row.index, row.id, attempts, \
                        answer.latency_s
                    part.cost_usd = cost(price, part.prompt_tokens, None, part.cached_tokens)
                    part.hold = answer.hold
                return parts
        return [Result(r.index, r.id, "failed", attempts=attempts, latency_s=answer.latency_s, error=error,
                       transient=answer.transient, hold=answer.hold) for r in rows]


class _Held:
    """A request's hold on the budget (None: no budget, or none left), with the attempts it
    lost counted as spent (see `Request.lost`, `Holds.unanswered`)."""

    def __init__(self, holds: Holds | None, request: Request | None, worst: Worst | None, times: int,
                 hold: Hold | None) -> None:
        self.holds, self.request, self.worst, self.times, self.hold = holds, request, worst, times, hold
        self.counted = 0
        self.paid = False  # an answer was paid for under the hold (re-asks follow)
        self.reached: BudgetReached | None = None  # the budget holds no request of this size: the job stops

    @classmethod
    async def take(cls, holds: Holds, request: Request, worst: Worst | None, times: int) -> _Held:
        """Hold `times` answers' worst case (none without a budget); the request asks
        again (`Request.again`) before an attempt follows a lost one."""
        held = cls(holds, request, worst, times, await holds.hold(worst, times) if worst is not None else None)
        if held.hold is not None:
            request.again = held.again
        return held

    async def again(self) -> str | None:
        """None if the budget holds another attempt, the lost ones spent; else why not."""
        return await self.count_lost(again=True)

    async def count_lost(self, *, again: bool = False) -> str | None:
        """The request's lost attempts not counted yet, spent; with `again`, another attempt
        is to follow: None if it may go, else why not (and `reached`, if the job must stop)."""
        if self.holds is None or self.request is None:  # nothing held, nothing to count
            return None
        while self.counted < self.request.lost:
            self.counted += 1
            last = self.hold
            if not self.paid:
                self.hold = None  # (let go inside: until held anew, nothing to let go)
            try:
                self.hold = await self.holds.unanswered(last, self.worst, self.times, again=again, paid=self.paid)
            except Crowded:  # the row fails (transient): a rerun asks it again
                return "the budget holds no other attempt beside the requests in flight"
            except BudgetReached as reached:  # the row fails (transient), and the job stops
                if self.holds.closing:
                    return "the job is stopping"
                self.reached = reached
                return "the budget holds no other attempt"
        return None


_UNHELD = _Held(None, None, None, 0, None)  # no price and no budget: nothing to hold or count


def _holds(value: Any, key: str) -> bool:
    """Whether any text in `value` (an answer's extra: choices, parsed JSON) holds `key`.
    Log-probabilities are passed over: a token is far shorter than a key, and a long
    answer's are thousands of texts."""
    if isinstance(value, str):
        return key in value
    if isinstance(value, dict):
        return any(k != "logprobs" and _holds(v, key) or isinstance(k, str) and key in k for k, v in value.items())
    if isinstance(value, list):
        return any(_holds(v, key) for v in value)
    return False
