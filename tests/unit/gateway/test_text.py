"""Token stream → text stream: UTF-8-safe increments and stop sequences."""

from __future__ import annotations

import random

import pytest

from gateway.engine.text import IncrementalDetokenizer, StopMatcher


class ByteTokenizer:
    """Each id stands for a byte string; decoding joins them and decodes UTF-8 with
    replacement, as real byte-level tokenizers do with an incomplete character."""

    def __init__(self, vocab: dict[int, bytes], special: frozenset[int] = frozenset()) -> None:
        self.vocab = vocab
        self.special = special
        self.calls = 0

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.calls += 1
        ids = [i for i in token_ids if not (skip_special_tokens and i in self.special)]
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


def tokenizer_for(pieces: list[bytes]) -> tuple[ByteTokenizer, list[int]]:
    vocab = dict(enumerate(pieces))
    return ByteTokenizer(vocab), list(vocab)


def stream(tokenizer: ByteTokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer)
    pushed = [detok.push(i) for i in ids]
    return pushed, detok.flush()


def split_bytes(data: bytes, rng: random.Random, max_piece: int = 3) -> list[bytes]:
    pieces = []
    i = 0
    while i < len(data):
        n = rng.randint(1, max_piece)
        pieces.append(data[i : i + n])
        i += n
    return pieces


# ---- IncrementalDetokenizer ----


def test_ascii_tokens_are_emitted_as_they_arrive() -> None:
    tok, ids = tokenizer_for([b"Hel", b"lo", b",", b" world"])
    pushed, rest = stream(tok, ids)
    assert pushed == ["Hel", "lo", ",", " world"]
    assert rest == ""


def test_split_two_byte_character_is_held_until_complete() -> None:
    data = "é".encode()
    tok, ids = tokenizer_for([b"caf", data[:1], data[1:], b"!"])
    pushed, rest = stream(tok, ids)
    assert pushed == ["caf", "", "é", "!"]
    assert rest == ""


def test_split_four_byte_character_across_four_tokens() -> None:
    data = "😀".encode()
    assert len(data) == 4
    tok, ids = tokenizer_for([b"x", *(data[i : i + 1] for i in range(4)), b"y"])
    pushed, rest = stream(tok, ids)
    assert pushed == ["x", "", "", "", "😀", "y"]
    assert "".join(pushed) + rest == "x😀y"


def test_token_holding_text_and_the_start_of_a_character() -> None:
    data = "€".encode()  # e2 82 ac
    tok, ids = tokenizer_for([b"ab" + data[:2], data[2:] + b"cd"])
    pushed, rest = stream(tok, ids)
    assert "".join(pushed) + rest == "ab€cd"
    assert all("\ufffd" not in p for p in pushed)


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_reassemble_exactly_and_never_emit_replacement(seed: int) -> None:
    rng = random.Random(seed)
    text = "Grüße, 世界! 😀 naïve café — ½ ∑ 𝄞 done."
    pieces = split_bytes(text.encode(), rng, max_piece=rng.randint(1, 5))
    tok, ids = tokenizer_for(pieces)
    pushed, rest = stream(tok, ids)
    assert "".join(pushed) + rest == tok.decode(ids, skip_special_tokens=True) == text
    for piece in pushed:
        assert "\ufffd" not in piece
    assert rest == ""


def test_flush_releases_an_incomplete_trailing_character() -> None:
    data = "世".encode()
    tok, ids = tokenizer_for([b"ok ", data[:2]])
    pushed, rest = stream(tok, ids)
    assert pushed == ["ok ", ""]
    assert rest == "\ufffd"  # what decoding everything gives
    assert "".join(pushed) + rest == tok.decode(ids, skip_special_tokens=True)


def test_flush_twice_gives_nothing_more() -> None:
    tok, ids = tokenizer_for([b"a", b"\xe4"])
    detok = IncrementalDetokenizer(tok)
    for i in ids:
        detok.push(i)
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_special_tokens_are_skipped() -> None:
    vocab = {0: b"<s>", 1: b"Hi", 2: b" there", 3: b"</s>"}
    tok = ByteTokenizer(vocab, special=frozenset({0, 3}))
    pushed, rest = stream(tok, [0, 1, 2, 3])
    assert "".join(pushed) + rest == "Hi there"


def test_pushes_continue_after_a_long_stream() -> None:
    pieces = [f"w{i} ".encode() for i in range(200)]
    tok, ids = tokenizer_for(pieces)
    pushed, rest = stream(tok, ids)
    assert pushed == [p.decode() for p in pieces]
    assert rest == ""
    # Each step decodes a short window, not the whole history.
    tok.calls = 0
    detok = IncrementalDetokenizer(tok)
    seen: list[list[int]] = []
    original = tok.decode

    def spy(token_ids: list[int], skip_special_tokens: bool = False) -> str:
        seen.append(list(token_ids))
        return original(token_ids, skip_special_tokens=skip_special_tokens)

    tok.decode = spy  # type: ignore[method-assign]
    for i in ids:
        detok.push(i)
    assert max(len(s) for s in seen) <= 4


def test_empty_stream() -> None:
    tok, _ = tokenizer_for([])
    assert IncrementalDetokenizer(tok).flush() == ""


# ---- StopMatcher ----


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], str, bool]:
    matcher = StopMatcher(stops)
    out = [matcher.push(p) for p in pieces]
    return out, matcher.flush(), matcher.stopped


def test_no_stops_passes_everything_through() -> None:
    out, rest, stopped = run([], ["a", "b", "c"])
    assert out == ["a", "b", "c"] and rest == "" and not stopped


def test_empty_stop_strings_are_ignored() -> None:
    out, rest, stopped = run(["", ""], ["hello"])
    assert out == ["hello"] and rest == "" and not stopped


def test_stop_in_one_piece() -> None:
    out, rest, stopped = run(["STOP"], ["abcSTOPdef"])
    assert out == ["abc"]
    assert stopped and rest == ""


def test_stop_at_the_very_start() -> None:
    out, _, stopped = run(["\n\n"], ["\n\nrest"])
    assert out == [""] and stopped


def test_stop_split_across_pushes() -> None:
    out, rest, stopped = run(["STOP"], ["hello S", "T", "OP world"])
    assert "".join(out) + rest == "hello "
    assert stopped
    assert out[0] == "hello "  # text before the partial stop is emitted at once


def test_stop_is_never_emitted_and_nothing_after_it() -> None:
    pieces = ["The ans", "wer is 4", "2.<|e", "nd|> and more", " text"]
    out, rest, stopped = run(["<|end|>"], pieces)
    assert stopped
    assert "".join(out) + rest == "The answer is 42."
    assert out[-1] == ""


def test_push_after_stop_returns_nothing() -> None:
    matcher = StopMatcher(["x"])
    assert matcher.push("abx") == "ab"
    assert matcher.push("more") == ""
    assert matcher.flush() == ""


def test_partial_prefix_is_held_then_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("go ST") == "go "
    assert not matcher.stopped
    assert matcher.push("ART") == "START"
    assert not matcher.stopped
    assert matcher.flush() == ""


def test_partial_prefix_held_across_several_pushes() -> None:
    matcher = StopMatcher(["abcd"])
    assert matcher.push("a") == ""
    assert matcher.push("b") == ""
    assert matcher.push("c") == ""
    assert matcher.push("x") == "abcx"
    assert not matcher.stopped


def test_released_prefix_may_start_a_new_partial() -> None:
    # "aab": the first "a" cannot start "ab" once a second "a" arrives, but that one can.
    matcher = StopMatcher(["ab"])
    assert matcher.push("a") == ""
    assert matcher.push("a") == "a"
    assert matcher.push("b") == ""
    assert matcher.stopped


def test_multiple_stops_pick_the_earliest() -> None:
    out, rest, stopped = run(["world", "lo"], ["hello world"])
    assert out == ["hel"] and stopped
    out, rest, stopped = run(["lo", "world"], ["hello world"])
    assert out == ["hel"] and rest == "" and stopped


def test_multiple_stops_split_across_pushes() -> None:
    out, rest, stopped = run(["END", "###"], ["one #", "# two E", "ND"])
    assert stopped  # "##" is not "###": the second stop ends it
    assert "".join(out) + rest == "one ## two "
    out, rest, stopped = run(["END", "###"], ["one #", "## two E", "ND"])
    assert stopped
    assert "".join(out) + rest == "one "


def test_flush_releases_held_text_when_no_stop() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("the end STO") == "the end "
    assert matcher.flush() == "STO"
    assert not matcher.stopped
    assert matcher.flush() == ""


def test_stop_found_across_held_text_and_new_piece_with_other_stop_later() -> None:
    out, rest, stopped = run(["xy", "z"], ["ax", "yz"])
    assert "".join(out) + rest == "a" and stopped


@pytest.mark.parametrize("seed", range(20))
def test_random_chunking_matches_cutting_the_whole_text(seed: int) -> None:
    rng = random.Random(seed)
    stops = ["</s>", "\n\nUser:", "||"]
    text = "Here is an answer | with pipes, <tags> and \nnewlines.\n\nUser: ignored || after"
    cut = min(i for i in (text.find(s) for s in stops) if i >= 0)
    pieces = []
    i = 0
    while i < len(text):
        n = rng.randint(1, 6)
        pieces.append(text[i : i + n])
        i += n
    out, rest, stopped = run(stops, pieces)
    assert stopped
    assert "".join(out) + rest == text[:cut]


@pytest.mark.parametrize("seed", range(10))
def test_random_chunking_without_a_stop_passes_everything(seed: int) -> None:
    rng = random.Random(seed)
    text = "<e <en <end not a stop <en"
    pieces = []
    i = 0
    while i < len(text):
        n = rng.randint(1, 4)
        pieces.append(text[i : i + n])
        i += n
    out, rest, stopped = run(["<end>"], pieces)
    assert not stopped
    assert "".join(out) + rest == text
    assert rest.endswith("<en")
