"""The job spec: a YAML (or JSON) file parsed into frozen dataclasses.

One parser builds the whole spec and rejects anything it does not know, naming the
key path and the key it probably meant: a misspelt `concurency` must never be
silently ignored, because the run it would spoil is long and paid for.

What an endpoint allows (its name, where a schema goes, what a budget needs, which
fields a template may give) is asked of the endpoint (`endpoints`); the values are
the dataclasses of `model`.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .._exceptions import SpecError
from ..endpoints import ENDPOINTS, implied_by, job_endpoint, taking
from ..endpoints.base import Endpoint
from ..endpoints.chat import Chat
from ..inputs.files import INPUT_SUFFIXES
from ..inputs.template import Template
from ..policy.pricing import MAX_TOKENS_KEYS, Price, completion_bound, whole
from .model import (
    BATCH_KINDS,
    DEFAULT_BASE_URL,
    FALLBACKS,
    ApiSpec,
    BatchApiSpec,
    BudgetSpec,
    CacheSpec,
    CheckpointSpec,
    JobSpec,
    RateLimitSpec,
    RetrySpec,
)
from .schema import Structure, schema_of
from .urls import is_url, work_folder

# The dataclasses are importable from here too: the parser and its values go together
__all__ = ["DEFAULT_BASE_URL", "ApiSpec", "BudgetSpec", "CheckpointSpec", "JobSpec", "RateLimitSpec", "RetrySpec",
           "load_spec", "parse_spec"]


def with_batch_api(spec: JobSpec) -> JobSpec:
    """The spec with `batch_api:` on (`--batch-api`): its own section, else every default."""
    if spec.batch_api is not None:
        return spec
    return dataclasses.replace(spec, batch_api=_batch_api(True, spec.api, spec.model, spec.endpoint))


def load_spec(path: str | os.PathLike[str]) -> JobSpec:
    """Read and validate the spec at `path`; relative paths resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the job spec: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    return parse_spec(raw, base_dir=path.parent, source=path)


def parse_spec(
    raw: Any,
    *,
    base_dir: str | os.PathLike[str] = ".",
    source: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> JobSpec:
    """Build a JobSpec from already-loaded YAML/JSON data."""
    where = f"{source}: " if source else ""
    env = os.environ if environ is None else environ
    try:
        return _build(_expand(raw, env, ""), Path(base_dir), source, env)
    except SpecError as exc:
        raise SpecError(f"{where}{exc}") from None


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, env: Mapping[str, str], path: str) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string, naming unset variables."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise SpecError(f"{path or 'spec'}: ${{{name}}} is not set; export it or write ${{{name}:-default}}")

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, env, _join(path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_keys(raw: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    for key in raw:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(allowed)}"
        raise SpecError(f"{_join(path, str(key))}: unknown key{hint}")


def _mapping(raw: Any, path: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path or 'spec'}: expected a mapping, got {type(raw).__name__}")
    return raw


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "source")


def _number(raw: Mapping[str, Any], key: str, path: str, default: Any, *, kind: type, minimum: float) -> Any:
    if key not in raw:
        return default
    value = raw[key]
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or not minimum <= value < float("inf"):
        what = "a whole number" if kind is int else "a number"
        raise SpecError(f"{_join(path, key)}: expected {what} >= {minimum}, got {value!r}")
    return kind(value)


def _flag(raw: Mapping[str, Any], key: str, path: str, default: bool = False) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise SpecError(f"{_join(path, key)}: expected true or false, got {value!r}")
    return value


def _string(raw: Mapping[str, Any], key: str, path: str, default: str | None) -> str | None:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise SpecError(f"{_join(path, key)}: expected a non-empty string, got {value!r}")
    return value


def _check_json(value: Any, path: str) -> None:
    """Params go into every request body as JSON: YAML's dates, `.nan` or `.inf` cannot,
    nor a lone surrogate (`"\\ud800"` in a double-quoted YAML string)."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError(f"{path}: holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is "
                        "not text; fix the text") from None
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{path}: cannot be sent as JSON ({exc}); quote dates, and use no .nan or .inf") from None


def _not_a_url(value: str, key: str) -> None:
    """`cache: s3://b/c.sqlite` would otherwise be a local folder named `s3:`."""
    if is_url(value):
        raise SpecError(f"{key}: {value!r} is a URL; the {key} must be a local file")


def _input(raw: Any, base_dir: Path) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """A file, a glob, or a list of them (globs are expanded when the job runs): local
    paths, or URLs on object storage (a glob in their last part), not both."""
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(item, str) and item for item in items):
        raise SpecError(f"input: expected a file, a glob or a list of them, got {raw!r}")
    paths, urls = [], []
    for item in items:
        if not glob.has_magic(item) and not item.endswith(INPUT_SUFFIXES):
            raise SpecError(f"input: {item!r} must end in {', '.join(INPUT_SUFFIXES[:-1])} or {INPUT_SUFFIXES[-1]}")
        if is_url(item):
            urls.append(item)
        else:
            paths.append(Path(os.path.abspath(base_dir / item)))
    if paths and urls:
        raise SpecError("input: local files and URLs do not mix in one job; copy them to one place")
    return tuple(paths), tuple(urls)


def _schema(raw: Any, params: dict[str, Any], endpoint: str | None) -> Mapping[str, Any] | None:
    """`schema:` is checked, and sent as the structured-output format unless params give one
    (where the endpoint says: `Endpoint.ask_for_schema`)."""
    if raw is None:
        found = schema_of(None, params)
        if found is not None:
            Structure(found, "params.response_format.json_schema.schema")
        return None
    schema = dict(_mapping(raw, "schema"))
    _check_json(schema, "schema")
    Structure(schema, "schema")
    job_endpoint(endpoint).ask_for_schema(params, {"name": "answer", "schema": schema, "strict": True})
    return schema


def _share(raw: Mapping[str, Any], key: str) -> float | None:
    value = _number(raw, key, "", None, kind=float, minimum=0)
    if value is not None and value > 1:
        raise SpecError(f"{key}: expected a share between 0 and 1 (0.01 is 1 %), got {value!r}")
    return value


def _pricing(raw: Any, base_dir: Path) -> dict[str, Price]:
    """`pricing:` as a mapping, or the name of a YAML file holding one (shared by many jobs)."""
    where = "pricing"
    if isinstance(raw, str):
        path = base_dir / raw
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SpecError(f"pricing: cannot read {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise SpecError(f"pricing: {path} is not valid YAML: {exc}") from None
        where = f"pricing ({path})"
    prices = {}
    for model, entry in _mapping(raw, where).items():
        path = f"{where}.{model}"
        entry = _mapping(entry, path)
        _check_keys(entry, ("input", "cached_input", "output", "batch"), path)
        batch = None
        if "batch" in entry:  # through a provider's batch API (else half the live prices)
            batch = _mapping(entry["batch"], f"{path}.batch")
            _check_keys(batch, ("input", "cached_input", "output"), f"{path}.batch")
            batch = _price(batch, f"{path}.batch")
        prices[str(model)] = dataclasses.replace(_price(entry, path), batch=batch)
    return prices


def _price(entry: Mapping[str, Any], path: str) -> Price:
    """One price: {input, cached_input, output}, USD per million tokens."""
    if "input" not in entry:
        raise SpecError(f"{path}.input: required; USD per million input tokens")
    return Price(
        input=_number(entry, "input", path, None, kind=float, minimum=0),
        output=_number(entry, "output", path, 0.0, kind=float, minimum=0),
        cached_input=_number(entry, "cached_input", path, None, kind=float, minimum=0),
    )


def _cache(raw: Any, base_dir: Path) -> CacheSpec | None:
    """`cache: path`, or `cache: {path: ..., everything: true}`."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"path": raw}
    cache = _mapping(raw, "cache")
    _check_keys(cache, ("path", "everything"), "cache")
    path = _string(cache, "path", "cache", None)
    if path is None:
        raise SpecError("cache.path: required; name the cache file (several jobs may share it)")
    _not_a_url(path, "cache")
    return CacheSpec(Path(os.path.abspath(base_dir / path)), everything=_flag(cache, "everything", "cache"))


def _budget(raw: Any) -> BudgetSpec:
    budget = _mapping(raw, "budget")
    _check_keys(budget, _fields(BudgetSpec), "budget")
    return BudgetSpec(
        max_usd=_number(budget, "max_usd", "budget", None, kind=float, minimum=0),
        max_tokens=_number(budget, "max_tokens", "budget", None, kind=int, minimum=0),
        assume_max_tokens=_number(budget, "assume_max_tokens", "budget", None, kind=int, minimum=1),
    )


def _template(raw: Any, endpoint: str | None) -> Mapping[str, Any] | None:
    if raw is None:
        return None
    template = _mapping(raw, "template")
    kinds = ENDPOINTS.values()
    _check_keys(template, tuple(dict.fromkeys(f for e in kinds for f in e.template_fields)), "template")
    fields = tuple(dict.fromkeys(e.field for e in kinds))  # what a request asks in: messages, prompt, input
    given = [key for key in fields if key in template]
    if len(given) != 1:
        ways = [f"{f} ({', '.join(taking(f))})" for f in fields]
        raise SpecError(f"template: give exactly one of {', '.join(ways[:-1])} or {ways[-1]}"
                        f"{'; it has ' + ' and '.join(given) if given else ''}")
    [kind] = given
    _check_json(template, "template")
    messages = template.get("messages")
    if kind == "messages" and (not isinstance(messages, list) or not messages or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m for m in messages)):
        raise SpecError("template.messages: expected a list of {role, content} messages")
    for key in ("prompt", "instructions"):
        if key in template and not isinstance(template[key], str):
            raise SpecError(f"template.{key}: expected a string")
    wanted = [e.name for e in kinds if kind in e.template_fields]
    if endpoint is not None and endpoint not in wanted or endpoint is None and implied_by(kind) is None:
        raise SpecError(f"template.{kind} is for endpoint: {' or '.join(wanted)}"
                        f"{'' if endpoint is None else f', but the spec sets endpoint: {endpoint}'}")
    for key in template.keys() - set(fields):  # what goes beside it (instructions)
        takers = [e.name for e in kinds if key in e.template_fields]
        if endpoint not in takers:
            raise SpecError(f"template.{key} is for endpoint: {' or '.join(takers)}")
    Template(template)  # a syntax error stops the job here, naming the string
    return dict(template)


def _base_url(url: str) -> str:
    if not url.startswith(("http://", "https://", "mock://")):
        raise SpecError(f"api.base_url: expected an http(s):// URL or mock://, got {url!r}")
    return url if url == "mock://" else url.rstrip("/")


def _build(raw: Any, base_dir: Path, source: Path | None, env: Mapping[str, str]) -> JobSpec:
    top = _mapping(raw, "")
    _check_keys(top, _fields(JobSpec), "")
    for key in ("input", "output"):
        if not top.get(key):
            raise SpecError(f"{key}: required; name the {key} file")
    input_paths, input_urls = _input(top["input"], base_dir)
    output_path, output_url = _output(str(top["output"]), base_dir, env)
    checkpoint = _checkpoint(top.get("checkpoint"))
    endpoint = _endpoint(top)
    params = dict(_mapping(top.get("params"), "params"))
    _check_json(params, "params")
    schema = _schema(top.get("schema"), params, endpoint)
    retry, rate_limit, api = _retry(top.get("retry")), _rate_limit(top.get("rate_limit")), _api(top.get("api"), env)
    pricing = _pricing(top.get("pricing"), base_dir)
    budget = _budget(top.get("budget"))
    model = _string(top, "model", "", None)
    _check_budget(budget, pricing, model, params, endpoint)
    return JobSpec(
        input=input_paths,
        output=output_path,
        model=model,
        endpoint=endpoint,
        params=dict(params),
        concurrency=_number(top, "concurrency", "", JobSpec.concurrency, kind=int, minimum=1),
        inputs_per_request=_number(top, "inputs_per_request", "", JobSpec.inputs_per_request, kind=int, minimum=1),
        retry=retry,
        rate_limit=rate_limit,
        api=api,
        template=_template(top.get("template"), endpoint),
        keep_request=_flag(top, "keep_request", ""),
        schema=schema,
        pricing=pricing,
        budget=budget,
        max_failed_share=_share(top, "max_failed_share"),
        cache=_cache(top.get("cache"), base_dir),
        checkpoint=checkpoint,
        batch_api=_batch_api(top.get("batch_api"), api, model, endpoint),
        input_urls=input_urls,
        output_url=output_url,
        tokenizer=Path(os.path.abspath(base_dir / tokenizer)) if (tokenizer := _string(top, "tokenizer", "", None))
        else None,
        source=source,
    )


def _output(raw: str, base_dir: Path, env: Mapping[str, str]) -> tuple[Path, str | None]:
    """The output's local path, and its URL where it is on object storage (the path is
    then its local working copy)."""
    output_url = raw if is_url(raw) else None
    output_path = work_folder(output_url, env) / output_url.rsplit("/", 1)[-1] if output_url else \
        Path(os.path.abspath(base_dir / raw))
    if output_path.suffix != ".parquet":
        raise SpecError(f"output: {raw!r} must end in .parquet")
    return output_path, output_url


def _endpoint(top: Mapping[str, Any]) -> str | None:
    endpoint = _string(top, "endpoint", "", None)
    if endpoint is not None and endpoint not in ENDPOINTS:
        raise SpecError(f"endpoint: expected one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    return endpoint


def _checkpoint(raw: Any) -> CheckpointSpec:
    checkpoint = _mapping(raw, "checkpoint")
    _check_keys(checkpoint, _fields(CheckpointSpec), "checkpoint")
    return CheckpointSpec(interval_s=_number(checkpoint, "interval_s", "checkpoint",
                                             CheckpointSpec.interval_s, kind=float, minimum=0.1))


def _retry(raw: Any) -> RetrySpec:
    retry = _mapping(raw, "retry")
    _check_keys(retry, _fields(RetrySpec), "retry")
    d = RetrySpec()
    return RetrySpec(
        max_attempts=_number(retry, "max_attempts", "retry", d.max_attempts, kind=int, minimum=1),
        backoff_initial_s=_number(retry, "backoff_initial_s", "retry", d.backoff_initial_s, kind=float, minimum=0),
        backoff_max_s=_number(retry, "backoff_max_s", "retry", d.backoff_max_s, kind=float, minimum=0),
        max_reasks=_number(retry, "max_reasks", "retry", d.max_reasks, kind=int, minimum=0),
        max_stall_s=_number(retry, "max_stall_s", "retry", d.max_stall_s, kind=float, minimum=0.1),
    )


def _rate_limit(raw: Any) -> RateLimitSpec:
    rate = _mapping(raw, "rate_limit")
    _check_keys(rate, _fields(RateLimitSpec), "rate_limit")
    return RateLimitSpec(
        requests_per_minute=_number(rate, "requests_per_minute", "rate_limit", None, kind=float, minimum=1),
        tokens_per_minute=_number(rate, "tokens_per_minute", "rate_limit", None, kind=float, minimum=1),
    )


def _api(raw: Any, env: Mapping[str, str]) -> ApiSpec:
    api = _mapping(raw, "api")
    _check_keys(api, _fields(ApiSpec), "api")
    default_base = env.get("OPENAI_API_BASE") or DEFAULT_BASE_URL
    base_url = _base_url(_string(api, "base_url", "api", default_base))
    return ApiSpec(
        base_url=base_url,
        api_key_env=_string(api, "api_key_env", "api", ApiSpec.api_key_env),
        timeout_s=_number(api, "timeout_s", "api", ApiSpec.timeout_s, kind=float, minimum=0.001),
        max_answer_mb=_number(api, "max_answer_mb", "api", ApiSpec.max_answer_mb, kind=float, minimum=0.001),
        allow_insecure_http=_flag(api, "allow_insecure_http", "api"),
        affinity=_flag(api, "affinity", "api", _on_fireworks(base_url)),
    )


FIREWORKS_BATCH_URL = "https://api.fireworks.ai/v1"  # datasets and batch jobs: not under /inference


@dataclass(frozen=True)
class _BatchKind:
    """What the spec must hold for one provider's batch API; the provider's own module
    (backends/batch/) states the same limits, and a test keeps the two equal."""

    name: str  # as messages say it
    endpoints: tuple[type[Endpoint], ...]  # the endpoints its batches answer (by kind, never by name)
    max_rows: int | None  # requests one batch takes; None: no limit of its own
    account: bool  # its datasets and jobs belong to an account (batch_api.account_id)
    one_model: bool  # a batch runs one model, the spec's
    base_url: str | None  # its batch API's URL; None: the live API's


_BATCH_KINDS = {
    "fireworks": _BatchKind("Fireworks", (Chat,), None, account=True, one_model=True, base_url=FIREWORKS_BATCH_URL),
    "openai": _BatchKind("OpenAI", tuple(type(e) for e in ENDPOINTS.values()), 50_000, account=False,
                         one_model=False, base_url=None),
}

def _batch_api(raw: Any, api: ApiSpec, model: str | None, endpoint: str | None) -> BatchApiSpec | None:
    """`batch_api:` (a mapping, or `true` for every default); None when absent or false."""
    if raw is None or raw is False:
        return None
    section = {} if raw is True else _mapping(raw, "batch_api")
    _check_keys(section, _fields(BatchApiSpec), "batch_api")
    kind = _string(section, "kind", "batch_api", "fireworks" if _on_fireworks(api.base_url) else "openai")
    if kind not in BATCH_KINDS:
        raise SpecError(f"batch_api.kind: {kind!r} is not a batch API batchrun knows; one of {', '.join(BATCH_KINDS)}")
    fallback = _string(section, "fallback", "batch_api", BatchApiSpec.fallback)
    if fallback not in FALLBACKS:
        raise SpecError(f"batch_api.fallback: expected live (send what the batches did not answer through the "
                        f"live API) or none (leave it failed), got {fallback!r}")
    account = _string(section, "account_id", "batch_api", None)
    _check_batch_kind(kind, account, model, endpoint)
    rows = _number(section, "rows_per_batch", "batch_api", None, kind=int, minimum=1)
    if rows is not None and (most := _BATCH_KINDS[kind].max_rows) is not None and rows > most:
        raise SpecError(f"batch_api.rows_per_batch: {_possessive(kind)} batch API takes at most {most:,} requests "
                        f"a batch, got {rows:,}")
    return BatchApiSpec(
        kind=kind,
        base_url=_base_url(_string(section, "base_url", "batch_api",
                                   _BATCH_KINDS[kind].base_url or api.base_url)),
        api_key_env=_string(section, "api_key_env", "batch_api", api.api_key_env),
        account_id=account,
        poll_interval_s=_number(section, "poll_interval_s", "batch_api", BatchApiSpec.poll_interval_s, kind=float,
                                minimum=0.001),
        rows_per_batch=rows,
        max_wait_h=_number(section, "max_wait_h", "batch_api", BatchApiSpec.max_wait_h, kind=float, minimum=0.001),
        fallback=fallback,
    )


def _on_fireworks(url: str) -> bool:
    host = url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    return host == "fireworks.ai" or host.endswith(".fireworks.ai")


def _check_batch_kind(kind: str, account: str | None, model: str | None, endpoint: str | None) -> None:
    """What one provider's batch API needs that another does not: refused before any request."""
    needs = _BATCH_KINDS[kind]
    if not isinstance(job_endpoint(endpoint), needs.endpoints):
        raise SpecError(f"batch_api: {_possessive(kind)} batch API does not answer the {job_endpoint(endpoint).name} "
                        "endpoint; drop batch_api to send these rows live")
    if needs.account and account is None:
        raise SpecError(f"batch_api.account_id: required for {_possessive(kind)} batch API; write "
                        f"account_id: ${{{needs.name.upper()}_ACCOUNT_ID}} and export it")
    if needs.one_model and model is None:
        raise SpecError(f"batch_api: {needs.name} runs one model a batch job; set model: in the spec")
    if not needs.account and account is not None:
        takers = " or ".join(_possessive(name) for name, other in _BATCH_KINDS.items() if other.account)
        raise SpecError(f"batch_api.account_id: only {takers} batch API takes an account; drop it")


def _possessive(kind: str) -> str:
    name = _BATCH_KINDS[kind].name
    return f"{name}'" if name.endswith("s") else f"{name}'s"

def _check_budget(budget: BudgetSpec, pricing: Mapping[str, Price], model: str | None,
                  params: Mapping[str, Any], endpoint: str | None) -> None:
    if budget.max_usd is not None and model is not None and model not in pricing:
        known = f" (priced: {', '.join(sorted(pricing))})" if pricing else ""
        raise SpecError(f"budget.max_usd: model {model!r} has no price in pricing{known}; "
                        "add its prices, USD per million tokens")
    if budget.is_set and job_endpoint(endpoint).generates:
        for key in ("n", "best_of"):  # answers generated, each up to max_tokens
            if params.get(key) is not None and whole(params[key]) is None:
                raise SpecError(f"budget: params.{key} is {json.dumps(params[key])}, no whole number, so the budget "
                                "cannot hold a request's worst case: make it one")
    if budget.is_set and budget.assume_max_tokens is None and job_endpoint(endpoint).generates:
        given = next((k for k in MAX_TOKENS_KEYS if k in params), None)
        if given is None:
            raise SpecError("budget: the worst case of a request needs its max_tokens: set params.max_tokens, "
                            "or budget.assume_max_tokens for requests without one")
        if completion_bound(params, None) is None:
            raise SpecError(f"budget: params.{given} is {json.dumps(params[given])}, which bounds no answer, so the budget "
                            f"cannot hold a request's worst case: make it a whole number, or set "
                            "budget.assume_max_tokens")
