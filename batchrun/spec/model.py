"""The job spec as values: frozen dataclasses, one per section, built by `parse`.

Defaults live here, beside the fields; what a value may be is checked by the parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..endpoints import get_endpoint
from ..policy.pricing import Price
from .schema import schema_of

__all__ = ["BATCH_KINDS", "DEFAULT_BASE_URL", "ApiSpec", "BatchApiSpec", "BudgetSpec", "CheckpointSpec", "JobSpec",
           "RateLimitSpec", "RetrySpec"]

DEFAULT_BASE_URL = "https://api.fireworks.ai/inference/v1"
BATCH_KINDS = ("fireworks", "openai")  # Fireworks' batch inference jobs; OpenAI's Files + Batches API
FALLBACKS = ("live", "none")


@dataclass(frozen=True)
class RetrySpec:
    max_attempts: int = 6
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_reasks: int = 2  # of an answer that is not valid JSON or breaks the schema
    # With no row settled this long, the job stops (exit 3); None: 600 s, or twice
    # api.timeout_s where that is longer (see `JobSpec.stall_s`)
    max_stall_s: float | None = None


@dataclass(frozen=True)
class RateLimitSpec:
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    @property
    def is_set(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


@dataclass(frozen=True)
class CheckpointSpec:
    interval_s: float = 10.0  # with the state on object storage: the longest between uploads


@dataclass(frozen=True)
class BudgetSpec:
    max_usd: float | None = None
    max_tokens: int | None = None
    # the worst case of completion tokens for a request that sets no max_tokens
    assume_max_tokens: int | None = None

    @property
    def is_set(self) -> bool:
        return self.max_usd is not None or self.max_tokens is not None


@dataclass(frozen=True)
class ApiSpec:
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 300.0
    max_answer_mb: float = 32.0  # one answer, decoded; past it the attempt fails
    allow_insecure_http: bool = False  # a key over plain http:// to another machine
    # Rows sharing a prompt's beginning go to one replica (`x-session-affinity`), where its
    # prefix cache serves them; by default on for Fireworks, whose cached tokens cost half
    affinity: bool = False

    @property
    def max_answer_bytes(self) -> int:
        return int(self.max_answer_mb * 2**20)


@dataclass(frozen=True)
class BatchApiSpec:
    """`batch_api:`: the rows go to the provider's batch API, at about half the live price,
    answered within a day; what it does not answer goes live (`fallback: live`) or fails."""

    kind: str  # one of BATCH_KINDS
    base_url: str  # the batch API's, which is not always the live API's (Fireworks)
    api_key_env: str
    account_id: str | None = None  # Fireworks: the account the datasets and jobs belong to
    poll_interval_s: float = 60.0
    rows_per_batch: int | None = None  # None: as many as the provider takes in one batch
    max_wait_h: float = 24.0  # after this, what the batches have not answered goes live
    fallback: str = "live"  # or "none": rows the batches did not answer stay failed


@dataclass(frozen=True)
class CacheSpec:
    """A response cache shared by jobs (see `engine.cache`)."""

    path: Path
    everything: bool = False  # cache requests that are not deterministic too


@dataclass(frozen=True)
class JobSpec:
    input: tuple[Path, ...]  # files or globs, absolute; see `inputs.files.expand_inputs`
    output: Path
    model: str | None = None
    endpoint: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    concurrency: int = 32
    inputs_per_request: int = 64  # embeddings: rows sent in one request
    retry: RetrySpec = field(default_factory=RetrySpec)
    rate_limit: RateLimitSpec = field(default_factory=RateLimitSpec)
    api: ApiSpec = field(default_factory=ApiSpec)
    template: Mapping[str, Any] | None = None  # see `inputs.template`
    keep_request: bool = False  # the body as sent, in a `request` column
    schema: Mapping[str, Any] | None = None  # answers are JSON valid against it: see `engine.structured`
    pricing: Mapping[str, Price] = field(default_factory=dict)  # model -> USD per million tokens
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    max_failed_share: float | None = None  # failed rows up to this share of all rows: exit 0
    tokenizer: Path | None = None  # a Hugging Face tokenizer.json, for `batchrun plan`
    cache: CacheSpec | None = None  # a response cache shared by jobs: see `engine.cache`
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    batch_api: BatchApiSpec | None = None  # how the rows are sent, not what they ask: no part of request_config
    # On object storage (see `storage.objects`): the URLs; `input` is then empty and `output` the
    # local working copy of the output.
    input_urls: tuple[str, ...] = ()
    output_url: str | None = None
    source: Path | None = None  # the spec file, for messages

    @property
    def name(self) -> str:
        return str(self.source) if self.source else "job spec"

    @property
    def grouped(self) -> bool:
        """Whether several rows go in one request (embeddings): the endpoint's say."""
        return self.endpoint is not None and get_endpoint(self.endpoint).grouped

    @property
    def rows_per_request(self) -> int:
        return self.inputs_per_request if self.grouped else 1

    def request_config(self) -> dict[str, Any]:
        """What shapes the answers: a resume must match it, or two jobs would mix."""
        config = {
            "model": self.model,
            "endpoint": self.endpoint,
            "params": dict(self.params),
            "base_url": self.api.base_url,  # answers from two servers must not mix
        }
        # Options added later join only when set, so that states saved before them resume.
        if self.template is not None:
            config["template"] = dict(self.template)
        if self.schema is not None:
            config["schema"] = dict(self.schema)
        return config

    @property
    def stall_s(self) -> float:
        """How long the job may go without settling a row before it stops."""
        return self.retry.max_stall_s or max(600.0, 2 * self.api.timeout_s)

    def answer_schema(self) -> Mapping[str, Any] | None:
        """The schema answers are held to: `schema:`, else a json_schema response_format."""
        return schema_of(self.schema, self.params)
