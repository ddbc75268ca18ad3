"""Summary: the exit code a run's counts add up to, and the line the CLI prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchrun.engine.summary import Summary


def summary(**changes: Any) -> Summary:
    values: dict[str, Any] = dict(
        job="job", output=Path("out/results.jsonl"), state=Path("out/.state.sqlite"), rows=10, ok=10, failed=0,
        prompt_tokens=700, completion_tokens=300, total_tokens=1000, requests=10, elapsed_s=2.04,
        output_written=True)
    return Summary(**{**values, **changes})


# exit_code

def test_every_row_ok_exits_0() -> None:
    assert summary().exit_code == 0


def test_failed_rows_exit_1() -> None:
    assert summary(ok=9, failed=1).exit_code == 1


def test_failed_rows_within_max_failed_share_exit_0() -> None:
    done = summary(ok=9, failed=1, max_failed_share=0.1)
    assert done.tolerated
    assert done.exit_code == 0


def test_failed_rows_beyond_max_failed_share_exit_1() -> None:
    done = summary(ok=8, failed=2, max_failed_share=0.1)
    assert not done.tolerated
    assert done.exit_code == 1


def test_max_failed_share_zero_tolerates_no_failure() -> None:
    assert summary(ok=9, failed=1, max_failed_share=0.0).exit_code == 1
    assert summary(max_failed_share=0.0).exit_code == 0


def test_an_aborted_run_exits_3_even_with_every_row_ok() -> None:
    assert summary(aborted="the budget is spent").exit_code == 3


def test_rows_left_unanswered_exit_3() -> None:
    done = summary(ok=6, failed=1)
    assert done.remaining == 3
    assert done.exit_code == 3


def test_aborted_beats_tolerated_failures() -> None:
    assert summary(ok=9, failed=1, max_failed_share=0.5, aborted="stopped").exit_code == 3


# line()

def test_line_of_a_clean_run() -> None:
    assert summary().line() == (
        "10 rows: 10 ok, 0 failed; 1,000 tokens (700 prompt, 300 completion); 10 requests in 2.0 s; "
        "output: out/results.jsonl")


def test_line_counts_with_thousands_separators_and_one_request_in_the_singular() -> None:
    line = summary(rows=12345, ok=12345, total_tokens=1234567, requests=1).line()
    assert line.startswith("12,345 rows: 12,345 ok, 0 failed; 1,234,567 tokens")
    assert "; 1 request in 2.0 s;" in line


def test_line_splits_failed_rows_into_retried_and_retry_failed_only() -> None:
    line = summary(ok=7, failed=3, failed_for_good=1).line()
    assert line.startswith("10 rows: 7 ok, 3 failed (2 retried by a rerun, 1 only with --retry-failed);")


def test_line_names_only_the_kind_of_failure_there_is() -> None:
    assert "(2 retried by a rerun);" in summary(ok=8, failed=2).line()
    assert "(2 only with --retry-failed);" in summary(ok=8, failed=2, failed_for_good=2).line()


def test_line_says_failures_are_within_max_failed_share() -> None:
    line = summary(ok=9, failed=1, max_failed_share=0.2).line()
    assert "1 failed (1 retried by a rerun; within max_failed_share);" in line


def test_line_counts_remaining_rows_and_names_the_state_when_no_output_was_written() -> None:
    line = summary(ok=4, failed=0, output_written=False).line()
    assert line.startswith("10 rows: 4 ok, 0 failed, 6 remaining;")
    assert line.endswith("; progress saved in out/.state.sqlite")


def test_line_prints_the_cost_in_dollars() -> None:
    assert "1,000 tokens (700 prompt, 300 completion), $1.50;" in summary(cost_usd=1.5).line()
    assert "completion), $0.0042;" in summary(cost_usd=0.0042).line()


def test_line_prints_no_cost_without_pricing_but_does_print_a_zero_cost() -> None:
    assert "$" not in summary().line()
    assert "completion), $0.00;" in summary(cost_usd=0.0).line()


def test_line_of_a_shard_starts_with_the_shard_and_ends_with_the_merge() -> None:
    line = summary(shard="2/4", merged="not merged: shard 1/4 is not done").line()
    assert line.startswith("shard 2/4: 10 rows: 10 ok")
    assert line.endswith("output: out/results.jsonl; not merged: shard 1/4 is not done")


def test_line_says_where_restart_moved_the_previous_output() -> None:
    line = summary(set_aside="out/results.jsonl.1").line()
    assert line.endswith("output: out/results.jsonl; the output before --restart was moved to out/results.jsonl.1")


def test_line_merge_comes_before_the_set_aside_output() -> None:
    line = summary(merged="merged 4 shards", set_aside="old.jsonl").line()
    assert line.endswith("; merged 4 shards; the output before --restart was moved to old.jsonl")


def test_line_counts_cache_hits_and_what_they_saved() -> None:
    assert "; 4 from the cache (" not in summary(cache_hits=4).line()
    assert "completion); 4 from the cache;" in summary(cache_hits=4).line()
    assert "; 4 from the cache ($0.25 saved);" in summary(cache_hits=4, saved_usd=0.25).line()


def test_line_counts_rows_answered_without_usage_singular_and_plural() -> None:
    assert "; 1 row answered without usage, charged at the worst case;" in summary(unmetered=1).line()
    assert "; 3 rows answered without usage, charged at the worst case;" in summary(unmetered=3).line()


def test_line_counts_requests_lost_with_their_worst_case_cost() -> None:
    line = summary(lost_requests=2, lost_usd=0.5, lost_tokens=1200).line()
    assert "; 2 requests that may have been paid for with no answer kept (in flight at a kill, timed out, cut short), " \
           "counted at the worst case ($0.50, 1,200 tokens);" in line
    assert "; 1 request that may have been paid for" in summary(lost_requests=1, lost_usd=0.01).line()
    # A budget of tokens alone: no price, so no dollars to show
    assert "counted at the worst case (2,636 tokens);" in summary(lost_requests=14, lost_tokens=2636).line()


def test_line_explains_requests_the_cache_could_not_look_up() -> None:
    line = summary(uncacheable=1).line()
    assert ("; 1 request not looked up in the cache: not deterministic (no temperature: 0 or seed; "
            "cache: {everything: true} caches all);") in line
    assert "; 2 requests not looked up in the cache" in summary(uncacheable=2).line()


def test_line_of_an_output_on_object_storage_names_the_url() -> None:
    assert summary(output="s3://bucket/out/results.parquet").line().endswith("output: s3://bucket/out/results.parquet")
