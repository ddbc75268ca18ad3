"""The `batchrun` command: thin over `run_job`, mapping outcomes to exit codes.

    0  every row ok            2  spec, input or config error (no request sent)
    1  finished, some failed   3  aborted (auth, quota, signal); rerun to resume
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from ._exceptions import ConfigError, Interrupted, JobAborted, UsageError
from .backends import run_job
from .backends.layout import Shard
from .backends.merge import merge_job
from .backends.ray.driver import run_on_ray  # Ray itself is imported only when asked for
from .engine.progress import make_progress
from .engine.summary import LOST
from .policy.pricing import usd
from .spec.parse import load_spec, with_batch_api
from .tools.export import export_job
from .tools.plan import plan_job
from .tools.status import job_status

__all__ = ["main"]

INTERNAL_ERROR = 4

RUN_EXAMPLE = """\
examples:
  batchrun run jobs/example.yaml               run or resume the job
  batchrun run jobs/example.yaml --limit 20    try the first 20 rows only
  batchrun run jobs/example.yaml --restart     discard saved progress, start over
  batchrun run jobs/example.yaml --retry-failed   also retry rows refused with a 4xx
  batchrun run jobs/example.yaml --ray         4 shards on a local Ray cluster, one rate limit
  batchrun run jobs/example.yaml --ray auto --ray-workers 16   on the running Ray cluster
  batchrun run jobs/example.yaml --batch-api   through the provider's batch API, at about half price

exit codes: 0 all rows ok, 1 some rows failed, 2 spec/input/config error
(no request sent), 3 aborted (auth, quota, signal): rerun to resume."""

SUBMIT_EXAMPLE = """\
examples:
  batchrun submit jobs/example.yaml            send the rows to the provider's batch API, exit 0
  batchrun status jobs/example.yaml --json     state "submitted" while batches are out, and their counts
  batchrun run jobs/example.yaml               collect what they answered (waiting if need be),
                                               the rest live (batch_api.fallback), write the output

A job's rows are never in two batches, and a rerun (run or submit) picks up the batches
already out. exit codes: 0 sent, 2 spec/input/config error (nothing sent), 3 aborted:
rerun to go on."""

PLAN_EXAMPLE = """\
examples:
  batchrun plan jobs/example.yaml
  batchrun plan jobs/example.yaml --json | jq .cost_usd_max
  batchrun plan jobs/example.yaml --restart    what `run --restart` would send

Validates the spec and every row, counts what a run (or a resumed run) would send: rows,
requests, prompt tokens, worst-case and expected completion tokens, cost at the spec's
prices and duration at its rate limits and concurrency. Sends no request."""

EXPORT_EXAMPLE = """\
examples:
  batchrun export jobs/example.yaml --format sft train.jsonl
  batchrun export jobs/example.yaml --format sft train.jsonl --all-choices --weight score
  batchrun export jobs/example.yaml --format openai-batch results.jsonl   (+ results.errors.jsonl)

Reads the finished output (and the input, for the requests); sends no request."""

MERGE_EXAMPLE = """\
examples:
  batchrun run jobs/example.yaml --shard 0/4 --no-merge   (and 1/4, 2/4, 3/4, anywhere)
  batchrun merge jobs/example.yaml             one Parquet file, every row once, in input order
  batchrun merge jobs/example.yaml --dataset   a folder of the parts, for very large jobs

exit codes: 0 merged, every row ok; 1 merged, some rows failed; 2 shards that do not
belong together (another N, spec or input); 3 a shard is missing, unfinished or running."""

STATUS_EXAMPLE = """\
examples:
  batchrun status jobs/example.yaml
  batchrun status jobs/example.yaml --json | jq .remaining"""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Outside the worker pool (which handles signals itself), SIGTERM and Ctrl-C stop
    # the run the same way: an exception that leaves the saved state as it was.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        code = COMMANDS[args.command][2](args)
        sys.stdout.flush()  # a closed pipe is met here, not at the interpreter's exit
        return code
    except UsageError as exc:
        print(f"batchrun: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except JobAborted as exc:
        print(f"batchrun: aborted: {exc}", file=sys.stderr)
        summary = getattr(exc, "summary", None)
        if summary is not None:
            print(f"batchrun: {summary.line()}", file=sys.stderr)
        if exc.rerun_resumes:
            print("batchrun: rerun the same command to resume", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `batchrun plan JOB | head`: the reader went away, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout at exit)
        return 128 + signal.SIGPIPE
    except Exception:  # a bug, not a user error: show it all
        traceback.print_exc()
        print("batchrun: internal error; the saved progress is intact, rerun to resume", file=sys.stderr)
        return INTERNAL_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchrun",
        description="Run batches of LLM requests against OpenAI-compatible APIs, resumably.",
        epilog="example:\n  batchrun run jobs/example.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, epilog, _, add_arguments) in COMMANDS.items():
        command = commands.add_parser(name, help=help_, epilog=epilog,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("job", metavar="JOB", help="the job spec (YAML)")
        add_arguments(command)
    return parser


def _run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--limit", type=_positive, metavar="N", help="settle only the first N input rows")
    run.add_argument("--restart", action="store_true", help="discard the saved progress and start over")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    run.add_argument("--retry-failed", action="store_true",
                     help="also retry rows that failed for good (a 4xx, an invalid answer); "
                          "rows that failed for transient reasons are always retried")
    run.add_argument("--max-failed-share", type=_share, metavar="SHARE",
                     help="exit 0 when at most this share of rows failed (0.01, or 1%%); overrides the spec")
    run.add_argument("--batch-api", action="store_true",
                     help="send the rows through the provider's batch API (about half price, within a day), as "
                          "`batch_api: true` in the spec would; what it does not answer goes live")
    run.add_argument("--shard", type=_shard, metavar="I/N",
                     help="run shard I (from 0) of N: a contiguous 1/N of the rows, with its own state and output "
                          "part; the last shard to finish merges the parts into the output")
    run.add_argument("--no-merge", action="store_true",
                     help="with --shard or --ray: leave the merge to `batchrun merge`")
    run.add_argument("--dataset", action="store_true", help="with --shard or --ray: merge into a Parquet dataset "
                                                            "folder (the output's name without .parquet)")
    run.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="run the job as shards on a Ray cluster (pip install 'batchrun[ray]'), sharing its rate "
                          "limits: ADDRESS as Ray takes it (auto, HOST:PORT, ray://...); without one, $RAY_ADDRESS "
                          "or a new cluster on this machine")
    run.add_argument("--ray-workers", type=_positive, default=4, metavar="N",
                     help="with --ray: shards run at once, each with 1/N of concurrency (default 4)")


def _submit_arguments(submit: argparse.ArgumentParser) -> None:
    submit.add_argument("--limit", type=_positive, metavar="N", help="send only the first N input rows")
    submit.add_argument("--restart", action="store_true", help="discard the saved progress and start over")
    submit.add_argument("--retry-failed", action="store_true", help="also send rows that failed for good again")
    submit.add_argument("--batch-api", action="store_true", help="`batch_api: true`, for a spec without the section")


def _merge_arguments(merge: argparse.ArgumentParser) -> None:
    merge.add_argument("--dataset", action="store_true",
                       help="a Parquet dataset folder of the parts (no copy) instead of one file")


def _status_arguments(status: argparse.ArgumentParser) -> None:
    status.add_argument("--json", action="store_true", help="one line of JSON (as the status file beside the output)")


def _plan_arguments(plan: argparse.ArgumentParser) -> None:
    plan.add_argument("--json", action="store_true", help="one line of JSON")
    plan.add_argument("--restart", action="store_true", help="plan `run --restart`: as if the saved progress "
                                                             "were discarded")


def _export_arguments(export: argparse.ArgumentParser) -> None:
    export.add_argument("out", metavar="OUT", help="the .jsonl file to write")
    export.add_argument("--format", required=True, choices=("sft", "openai-batch"),
                        help="sft: {messages} samples; openai-batch: the Batch API's output (and error) file")
    export.add_argument("--include-truncated", action="store_true", help="sft: answers cut by max_tokens too")
    export.add_argument("--all-choices", action="store_true", help="sft: a sample per choice of n")
    export.add_argument("--weight", metavar="COLUMN", help="sft: the answer's weight, 0 or 1, from this output column")


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _share(text: str) -> float:
    """0.01 or 1%."""
    try:
        value = float(text.removesuffix("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share such as 0.01 or 1%, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1 (0 % and 100 %), got {text!r}")
    return value


def _run(args: argparse.Namespace) -> int:
    if args.ray is not None:
        return _run_ray(args)
    summary = run_job(
        with_batch_api(load_spec(args.job)) if args.batch_api else args.job,
        limit=args.limit,
        restart=args.restart,
        retry_failed=args.retry_failed,
        max_failed_share=args.max_failed_share,
        progress=make_progress(not args.no_progress),
        handle_signals=True,
        shard=args.shard,
        merge=None if args.no_merge else "dataset" if args.dataset else "file",
    )
    print(f"batchrun: {summary.line()}")
    return summary.exit_code


def _submit(args: argparse.Namespace) -> int:
    spec = load_spec(args.job)
    if args.batch_api:
        spec = with_batch_api(spec)
    if spec.batch_api is None:
        raise ConfigError(f"{spec.name} has no batch_api: section: `batchrun submit` sends a job's rows to the "
                          "provider's batch API; add `batch_api: true` to the spec (or pass --batch-api), or use "
                          "`batchrun run` to send them live")
    summary = run_job(spec, limit=args.limit, restart=args.restart, retry_failed=args.retry_failed,
                      handle_signals=True, submit=True)
    print(f"batchrun: {summary.line()}")
    return summary.exit_code


def _run_ray(args: argparse.Namespace) -> int:
    if args.shard is not None or args.limit is not None:
        raise ConfigError("--ray makes the shards itself and runs every row: drop --shard and --limit")
    if args.batch_api:  # its shards would send live what the batch API answers at half price
        raise ConfigError("--batch-api and --ray do not go together: a provider's batch API takes the whole job "
                          "at once; drop one of them")
    summary = run_on_ray(
        args.job, address=args.ray or None, workers=args.ray_workers, restart=args.restart,
        retry_failed=args.retry_failed, max_failed_share=args.max_failed_share,
        merge=None if args.no_merge else "dataset" if args.dataset else "file",
        progress=make_progress(not args.no_progress),
    )
    print(f"batchrun: {summary.line()}")
    return summary.exit_code


def _merge(args: argparse.Namespace) -> int:
    summary = merge_job(load_spec(args.job), dataset=args.dataset)
    print(f"batchrun: {summary.line()}")
    return summary.exit_code


def _plan(args: argparse.Namespace) -> int:
    plan = plan_job(args.job, restart=args.restart)
    print(json.dumps(plan.as_dict()) if args.json else plan.text())
    return 0


def _export(args: argparse.Namespace) -> int:
    summary = export_job(args.job, args.format, args.out, include_truncated=args.include_truncated,
                         all_choices=args.all_choices, weight=args.weight)
    print(f"batchrun: {summary.line()}")
    return 0


def _status(args: argparse.Namespace) -> int:
    data = job_status(load_spec(args.job))
    if args.json:
        print(json.dumps(data))  # one line: a scheduler's XCom takes the last line of output
        return 0
    print(f"{data['job']}: {data['state']}" + (f" (pid {data['pid']})" if data["state"] == "running" else "")
          + (f": {data['reason']}" if data.get("reason") else ""))
    if data["state"] == "not started":
        return 0
    print(f"  rows       {data['rows']:,}")
    print(f"  ok         {data['ok']:,}")
    print(f"  failed     {data['failed']:,}" + (f" ({data['failed_for_good']:,} only with --retry-failed)"
                                                if data["failed_for_good"] else ""))
    print(f"  remaining  {data['remaining']:,}")
    print(f"  tokens     {data['total_tokens']:,} ({data['prompt_tokens']:,} prompt, "
          f"{data['completion_tokens']:,} completion)")
    if data.get("cost_usd") is not None:
        print(f"  cost       {usd(data['cost_usd'])}")
    if data.get("lost_requests"):  # with a budget: what may have been paid for with no answer counts as spent
        print(f"  lost       {data['lost_requests']:,} requests {LOST}, counted against the budget at "
              + (f"{usd(data['lost_usd'])}, " if data.get("lost_usd") else "")
              + f"{data.get('lost_tokens') or 0:,} tokens")
    if data.get("exit_code") is not None:
        print(f"  exit code  {data['exit_code']} (the last run's)")
    written = data["state"] == "finished" or Path(data["output"]).exists()
    print(f"  output     {data['output']}{'' if written else ' (not written yet)'}")
    for batch in data.get("batches", ()):
        counts = batch["counts"]
        print(f"  batch {batch['id'] or '(being sent)'}  {batch['state']}"
              + (f": {counts.get('completed', 0):,} of {counts['total']:,} done" if counts.get("total") else ""))
    for shard in data.get("shards", ()):
        print(f"  shard {shard['shard']:>9}  {shard['state']:<11}  {shard.get('ok', 0):,} ok, "
              f"{shard.get('failed', 0):,} failed, {shard.get('remaining', shard.get('rows', 0)):,} remaining"
              + (f" (pid {shard['pid']})" if shard["state"] == "running" else "")
              + (f": {shard['reason']}" if shard.get("reason") else ""))
    return 0


# Each command: its help, its examples, what runs it, and its arguments beside JOB
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.Namespace], int],
                          Callable[[argparse.ArgumentParser], None]]] = {
    "run": ("run or resume a job", RUN_EXAMPLE, _run, _run_arguments),
    "submit": ("send a job's rows to the provider's batch API and return at once; `run` collects them",
               SUBMIT_EXAMPLE, _submit, _submit_arguments),
    "merge": ("make a sharded job's output from its shards' parts, sending no request", MERGE_EXAMPLE, _merge,
              _merge_arguments),
    "status": ("show a job's progress from its saved state, sending no request", STATUS_EXAMPLE, _status,
               _status_arguments),
    "plan": ("what a run would send and could cost, sending nothing", PLAN_EXAMPLE, _plan, _plan_arguments),
    "export": ("write a finished job's answers as a fine-tuning set or OpenAI Batch API files", EXPORT_EXAMPLE,
               _export, _export_arguments),
}
