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
    "BarProgress": "engine.progress", "LogProgress": "engine.progress",
    "NullProgress": "engine.progress", "Progress": "engine.progress",
    "run_on_ray": "backends.ray.driver",  # and Ray itself only when called
    "Summary": "engine.summary", "run_job": "backends",
    "MergeSummary": "backends.merge", "Shard": "backends.layout", "merge_job": "backends.merge",
    "ApiSpec": "spec.model", "JobSpec": "spec.model", "RetrySpec": "spec.model",
    "load_spec": "spec.parse", "parse_spec": "spec.parse",
    "job_status": "tools.status",
}

if TYPE_CHECKING:
    from .backends import run_job
    from .backends.layout import Shard
    from .backends.merge import MergeSummary, merge_job
    from .backends.ray.driver import run_on_ray
    from .engine.progress import BarProgress, LogProgress, NullProgress, Progress
    from .engine.summary import Summary
    from .spec.model import ApiSpec, JobSpec, RetrySpec
    from .spec.parse import load_spec, parse_spec
    from .tools.status import job_status


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
