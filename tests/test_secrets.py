"""Redactor: no piece of the API key long enough to help guess it survives, however a
server echoes it; text without such a piece is left as it was."""

from __future__ import annotations

import json
import random
import re
import string

import pytest

from batchrun.http.secrets import MIN_RUN, REDACTED, Redactor

KEY = "sk-test-0123456789abcdef"


def pieces(key: str) -> set[str]:
    return {key[i:i + MIN_RUN] for i in range(len(key) - MIN_RUN + 1)}


def leaked(text: str, key: str) -> list[str]:
    """The key's MIN_RUN-long pieces in `text`, as they stand or with everything the key
    does not contain read past (the redaction marker counts as a break)."""
    keyish = set(key)
    squeezed = ["".join(c for c in part if c in keyish) for part in text.split(REDACTED)]
    return sorted(p for p in pieces(key) if p in text or any(p in s for s in squeezed))


redact = Redactor(KEY)


def test_the_whole_key_is_replaced() -> None:
    assert redact(f"Incorrect API key provided: {KEY}.") == f"Incorrect API key provided: {REDACTED}."


def test_every_occurrence_is_replaced() -> None:
    assert redact(f"{KEY} and again {KEY}") == f"{REDACTED} and again {REDACTED}"


def test_the_key_twice_in_a_row_leaves_nothing_of_it() -> None:
    out = redact(f"<{KEY}{KEY}>")
    assert out.startswith("<") and out.endswith(">")
    assert not leaked(out, KEY)


def test_a_key_cut_in_half_by_a_length_limit_is_replaced() -> None:
    assert redact(f"key: {KEY[:12]}...") == f"key: {REDACTED}..."
    assert redact(f"...{KEY[-10:]} is wrong") == f"...{REDACTED} is wrong"


def test_exactly_min_run_characters_of_the_key_are_replaced() -> None:
    assert redact(f"x {KEY[5:5 + MIN_RUN]} y") == f"x {REDACTED} y"


def test_a_run_one_shorter_than_min_run_is_left_alone() -> None:
    short = KEY[5:5 + MIN_RUN - 1]
    assert redact(f"xyz {short} uvw") == f"xyz {short} uvw"


def test_a_spaced_out_key_is_replaced_with_its_spaces() -> None:
    assert redact(f"key = {' '.join(KEY)} !") == f"key = {REDACTED} !"


def test_a_key_broken_over_lines_is_replaced() -> None:
    assert redact(f"Bearer {KEY[:10]}\n{KEY[10:]}\nnext line") == f"Bearer {REDACTED}\nnext line"
    assert redact(f"{KEY[:9]}\r\n    {KEY[9:]}") == REDACTED


def test_a_key_inside_a_json_string_escaped_once_and_twice() -> None:
    once = json.dumps({"error": {"message": f"bad key\n{KEY}\n"}})
    twice = json.dumps(once)
    for text in (once, twice):
        out = redact(text)
        assert KEY not in out and REDACTED in out
        assert not leaked(out, KEY)
    assert json.loads(redact(once)) == {"error": {"message": f"bad key\n{REDACTED}\n"}}


def test_a_key_with_slashes_escaped_by_the_server_is_replaced() -> None:
    key = "sk-ab/cd+ef/0123456789"
    escaped = key.replace("/", "\\/")  # some JSON writers escape every slash
    out = Redactor(key)(f'{{"message": "bad key {escaped}"}}')
    assert out == f'{{"message": "bad key {REDACTED}"}}'


def test_a_key_with_unicode_escapes_in_it_leaves_no_long_piece() -> None:
    out = redact(f"\"{KEY.replace('-', chr(92) + 'u002d')}\"")
    assert REDACTED in out
    assert not leaked(out, KEY)


def test_regex_characters_in_the_key_are_taken_literally() -> None:
    key = "sk-]^\\[a-z].*+?(x){2}|$"
    text = f"the key {key} was rejected"
    assert Redactor(key)(text) == f"the key {REDACTED} was rejected"
    assert Redactor(key)("nothing [a-z] here") == "nothing [a-z] here"


def test_text_without_the_key_is_left_alone() -> None:
    text = "HTTP 429: rate limit exceeded, retry in 20 s (request 7f3a)\n"
    assert redact(text) == text


def test_short_runs_of_key_characters_apart_are_left_alone() -> None:
    text = "the test at 0123 is best"  # pieces of the key, none MIN_RUN long even read together
    assert redact(text) == text


def test_text_shorter_than_min_run_is_returned_as_it_is() -> None:
    assert redact(KEY[:MIN_RUN - 1]) == KEY[:MIN_RUN - 1]
    assert redact("") == ""


@pytest.mark.parametrize("secret", [None, "", "short", "x" * (MIN_RUN - 1)])
def test_no_key_or_a_key_shorter_than_min_run_redacts_nothing(secret: str | None) -> None:
    text = f"anything at all: short {secret} xxxxxxx"
    assert Redactor(secret)(text) == text


def test_a_key_of_exactly_min_run_characters_is_redacted() -> None:
    key = "abcd1234"
    assert Redactor(key)(f"bad key {key}!") == f"bad key {REDACTED}!"


def test_no_redacted_text_holds_a_min_run_piece_of_the_key() -> None:
    """Random texts of noise and key pieces, spaced, split and escaped in random ways."""
    rng = random.Random(19)
    noise = string.ascii_letters + string.digits + " \n\t\"\\{}:,.-_/"
    for round_ in range(400):
        key = KEY if round_ % 2 else "sk-" + "".join(rng.choices(string.ascii_letters + string.digits, k=40))
        parts = []
        for _ in range(rng.randint(1, 6)):
            parts.append("".join(rng.choices(noise, k=rng.randint(0, 20))))
            start = rng.randrange(len(key))
            piece = key[start:start + rng.randint(1, len(key))]
            glue = rng.choice(["", " ", "\n", "\\n", "\r\n  ", '"'])
            if glue and len(piece) > 1:
                cut = rng.randrange(1, len(piece))
                piece = piece[:cut] + glue + piece[cut:]
            parts.append(piece)
        text = "".join(parts)
        out = Redactor(key)(text)
        assert not leaked(out, key), (key, text, out)


def test_only_the_key_is_cut_out_the_text_around_it_stays() -> None:
    before, after = "Error: invalid key '", "'; see https://platform.example/keys"
    out = redact(before + KEY + after)
    assert out == before + REDACTED + after
    assert re.fullmatch(r"Error: invalid key '\[redacted\]'; see https://platform\.example/keys", out)
