"""batchrun: resumable batch runs of LLM requests against OpenAI-compatible APIs."""

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
from ._progress import BarProgress, LogProgress, NullProgress, Progress
from ._ray import run_on_ray  # imports Ray only when called
from ._runner import Summary, run_job
from ._shards import MergeSummary, Shard, merge_job
from ._spec import ApiSpec, JobSpec, RetrySpec, load_spec, parse_spec
from ._status import job_status

from ._version import __version__

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
