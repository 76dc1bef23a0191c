"""Incremental detokenization: whole UTF-8 characters only, and stop strings that never leak."""

from __future__ import annotations

from model_parallel.detokenizer import IncrementalDetokenizer


def stream(tokenizer, text: str, stop: list[str]) -> tuple[list[str], str | None]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer, [1, 2], stop, True)
    deltas, hit = [], None
    for t in ids:
        hit = d.add(t)
        deltas.append(d.delta(final=hit is not None))
        if hit:
            break
    if not hit:
        deltas.append(d.delta(final=True))
    return deltas, hit


def test_multibyte_characters_arrive_whole(tokenizer) -> None:
    text = "Café 🎉 naïve 日本語 done"
    deltas, _ = stream(tokenizer, text, [])
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(tokenizer.encode("🎉", add_special_tokens=False)) > 1  # the emoji spans tokens


def test_stop_string_across_tokens_is_cut_and_never_streamed(tokenizer) -> None:
    deltas, hit = stream(tokenizer, "Hello there, General Kenobi. More text", ["General Ken"])
    assert hit == "General Ken"
    assert "".join(deltas) == "Hello there, "
    assert not any("Gen" in d for d in deltas)


def test_earliest_of_several_stops_wins(tokenizer) -> None:
    deltas, hit = stream(tokenizer, "one two three four", ["four", "two"])
    assert hit == "two" and "".join(deltas) == "one "


def test_stops_can_be_switched_off_for_min_tokens(tokenizer) -> None:
    d = IncrementalDetokenizer(tokenizer, [1], ["two"], True)
    for t in tokenizer.encode("one two", add_special_tokens=False):
        assert d.add(t, check_stop=False) is None
    assert d.delta(final=True) == "one two"
