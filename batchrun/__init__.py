"""batchrun: resumable batch runs of LLM requests against OpenAI-compatible APIs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._exceptions import (
    APIError,
    BatchrunError,
    BudgetReached,
    ConfigError,
    InputChangedError,
    InputError,
    Interrupted,
    JobAborted,
    JobFatalAPIError,
    RetryableAPIError,
    RowFatalAPIError,
    SpecError,
    Stalled,
    StateDamagedError,
    StateMismatchError,
    StorageError,
    UsageError,
)
from ._version import __version__

# The rest loads on first use (PEP 562), so that `import batchrun` (and the command,
# before it parses its arguments) does not wait for pyarrow and the HTTP stack.
_LAZY = {
    "BarProgress": "_progress", "LogProgress": "_progress", "NullProgress": "_progress", "Progress": "_progress",
    "run_on_ray": "_ray",  # and Ray itself only when called
    "Summary": "_runner", "run_job": "_runner",
    "MergeSummary": "_shards", "Shard": "_shards", "merge_job": "_shards",
    "ApiSpec": "_spec", "JobSpec": "_spec", "RetrySpec": "_spec", "load_spec": "_spec", "parse_spec": "_spec",
    "job_status": "_status",
}

if TYPE_CHECKING:
    from ._progress import BarProgress, LogProgress, NullProgress, Progress
    from ._ray import run_on_ray
    from ._runner import Summary, run_job
    from ._shards import MergeSummary, Shard, merge_job
    from ._spec import ApiSpec, JobSpec, RetrySpec, load_spec, parse_spec
    from ._status import job_status


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

__all__ = [
    "__version__",
    "APIError",
    "ApiSpec",
    "BarProgress",
    "BatchrunError",
    "BudgetReached",
    "ConfigError",
    "InputChangedError",
    "InputError",
    "Interrupted",
    "JobAborted",
    "JobFatalAPIError",
    "MergeSummary",
    "Shard",
    "merge_job",
    "JobSpec",
    "LogProgress",
    "NullProgress",
    "Progress",
    "RetryableAPIError",
    "RetrySpec",
    "RowFatalAPIError",
    "SpecError",
    "Stalled",
    "StateDamagedError",
    "StateMismatchError",
    "StorageError",
    "Summary",
    "UsageError",
    "job_status",
    "load_spec",
    "parse_spec",
    "run_on_ray",
    "run_job",
]
