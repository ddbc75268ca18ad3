"""A settled row (`Result`) and the helpers answers are read and exported with, from values."""

from __future__ import annotations

from batchrun.endpoints.result import (
    RESULT_FIELDS,
    STORED_ONLY,
    Result,
    answer_id,
    map_texts,
    set_usage,
    storable,
    storable_text,
    text_of,
    usage_counts,
)

ROW = {"row_index": 4, "response_id": None, "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": None}


def test_the_stored_fields_leave_out_what_only_the_run_holds() -> None:
    assert {"vectors", "cache_key", "hold"}.isdisjoint(RESULT_FIELDS)
    assert set(STORED_ONLY) <= set(RESULT_FIELDS)
    assert RESULT_FIELDS[:3] == ("row_index", "id", "status")


def test_usage_counts_fill_a_missing_total_and_need_both_sides() -> None:
    assert usage_counts(ROW) == (3, 2, 5)
    assert usage_counts({**ROW, "total_tokens": 9}) == (3, 2, 9)  # the server's total, as it said
    assert usage_counts({**ROW, "completion_tokens": None}) is None


def test_an_answer_without_the_servers_id_gets_one_from_its_row() -> None:
    assert answer_id(ROW, "resp") == "resp_4"
    assert answer_id({**ROW, "response_id": "r-1"}, "resp") == "r-1"


def test_usage_outside_int64_or_negative_is_no_count() -> None:
    result = Result(0, "a", "ok")
    set_usage(result, {"prompt_tokens": 2**63, "completion_tokens": -1, "total_tokens": 1.5,
                       "prompt_tokens_details": {"cached_tokens": 4}})
    assert (result.prompt_tokens, result.completion_tokens, result.total_tokens, result.cached_tokens) == (
        None, None, None, 4)
    set_usage(result, "not a mapping")  # ignored
    assert result.cached_tokens == 4


def test_texts_are_made_storable_everywhere_in_an_answer() -> None:
    assert storable_text("a\ud83d\ude00b") == "a😀b"  # a pair split across two chunks, joined
    assert storable_text("x\ud800") == "x\ufffd"
    result = storable(Result(0, "a", "ok", output_text="\udfff", extra={"k\ud800": ["\ud800"]}))
    assert (result.output_text, result.extra) == ("\ufffd", {"k\ufffd": ["\ufffd"]})
    assert map_texts({"a": ["b", 1]}, str.upper) == {"A": ["B", 1]}


def test_any_shape_the_server_sends_becomes_text() -> None:
    assert text_of([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    assert (text_of(3), text_of(None), text_of(True), text_of({"x": 1})) == ("3", None, "true", '{"x": 1}')


def test_cached_tokens_are_read_where_each_server_puts_them() -> None:
    """OpenAI's and Fireworks' prompt_tokens_details first; else a top-level count (some
    proxies) or DeepSeek's prompt_cache_hit_tokens: a cached token is priced as one."""
    base = {"prompt_tokens": 100, "completion_tokens": 5}
    for usage, cached in [({**base, "prompt_tokens_details": {"cached_tokens": 64}}, 64),
                          ({**base, "cached_tokens": 32}, 32), ({**base, "prompt_cache_hit_tokens": 16}, 16),
                          ({**base, "prompt_tokens_details": {"cached_tokens": 8}, "cached_tokens": 32}, 8),
                          (base, None)]:
        result = Result(0, "a", "ok")
        set_usage(result, usage)
        assert result.cached_tokens == cached, usage
