"""Every error batchrun raises, in one hierarchy.

    BatchrunError
    ├── UsageError                 exit 2, raised before any request is sent
    │   ├── SpecError              the job spec: unknown key, wrong type, bad value
    │   ├── InputError             the input file: unreadable, malformed line, duplicate ids
    │   ├── ConfigError            the environment: missing API key, unwritable output
    │   └── StateMismatchError     the saved state belongs to another input or request shape
    │       └── StateDamagedError  the state file is not a whole batchrun state (--restart)
    ├── JobAborted                 exit 3: the job stopped before every row was settled
    │   ├── JobFatalAPIError       401/403, insufficient quota, every row failing alike
    │   ├── StorageError           the state or output cannot be written (disk full, folder gone)
    │   ├── InputChangedError      the input file was changed in place while the job read it
    │   ├── BudgetReached          the next request could take the job past its budget
    │   ├── Stalled                no row settled for retry.max_stall_s (a server refusing all)
    │   └── Interrupted            a signal asked the job to stop
    └── APIError                   one request failed; the runner turns it into row data
        ├── RetryableAPIError      429, 5xx, timeouts, dropped connections, broken bodies
        └── RowFatalAPIError       any other 4xx: this row can never succeed as sent

`APIError` never escapes `run_job`: a failed row is data (status, error, attempts).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIError",
    "BatchrunError",
    "BudgetReached",
    "ConfigError",
    "InputError",
    "InputChangedError",
    "Interrupted",
    "JobAborted",
    "JobFatalAPIError",
    "RetryableAPIError",
    "RowFatalAPIError",
    "SpecError",
    "StateDamagedError",
    "StateMismatchError",
    "Stalled",
    "StorageError",
    "UsageError",
]


class BatchrunError(Exception):
    """Base of every error batchrun raises on purpose."""


class UsageError(BatchrunError):
    """Something the user must fix before the job can start (exit code 2)."""

    exit_code = 2


class SpecError(UsageError):
    """The job spec is invalid; the message names the offending key path."""


class InputError(UsageError):
    """The input file cannot be read as rows; the message names file and line."""


class ConfigError(UsageError):
    """The environment does not allow the job to run (missing key, unwritable output)."""


class StateMismatchError(UsageError):
    """The saved progress was written for another input or request configuration."""


class StateDamagedError(StateMismatchError):
    """The state file is not a whole batchrun state (empty, garbage, edited); only --restart
    moves past it."""


class JobAborted(BatchrunError):
    """The job stopped early; its state is saved and a rerun resumes it (exit code 3)."""

    exit_code = 3
    rerun_resumes = True  # False where the message says what must change first


class BudgetReached(JobAborted):
    """The job's budget does not allow the next request; raise it and rerun to go on."""

    rerun_resumes = False  # only with a larger budget: the message says so


class JobFatalAPIError(JobAborted):
    """The API refused in a way no retry or later row can fix (bad key, no quota)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StorageError(JobAborted):
    """The state or the output could not be written; what was saved before is intact."""


class InputChangedError(JobAborted):
    """The input file was changed in place while the job read it; what was read before is
    consistent, and the job stopped before reading more."""

    rerun_resumes = False  # only with the original content back


class Stalled(JobAborted):
    """No row was settled for `retry.max_stall_s`: the server takes requests but answers
    none (every one a 429, say). A rerun resumes once it answers again."""


class Interrupted(JobAborted):
    """The job was asked to stop by a signal."""


class APIError(BatchrunError):
    """One request failed. `status` is None when no HTTP answer arrived."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableAPIError(APIError):
    """A failure worth retrying; `retry_after` is the server's requested wait in seconds;
    `verdict`: the retry policy's `policy.verdict.Verdict` on the attempt, which says
    how long to wait before the next (None: an error raised outside the client)."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None, verdict: Any = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after
        self.verdict = verdict


class RowFatalAPIError(APIError):
    """The API rejected this row's request; retrying it unchanged cannot help."""
