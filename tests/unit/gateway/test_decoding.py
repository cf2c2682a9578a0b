"""Sampling and the token → text stream (UTF-8 safety, stop sequences)."""

from __future__ import annotations

import pytest
import torch

from gateway.sampling import SamplingParams, logits_to_probs, make_generator, sample
from gateway.text import IncrementalDetokenizer, StopMatcher


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, SamplingParams(temperature=0.0), make_generator(0)) == 1


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = torch.zeros(1000)  # flat: every seed draws differently
    params = SamplingParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        rng = make_generator(seed)
        return [sample(logits, params, rng) for _ in range(8)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = logits_to_probs(logits, temperature=1.0, top_p=0.7)
    assert probs[2] == 0 and probs[3] == 0
    assert torch.allclose(probs[:2], torch.tensor([0.625, 0.375]))
    only_top = logits_to_probs(logits, temperature=1.0, top_p=0.01)
    assert torch.equal(only_top, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_low_temperature_sharpens() -> None:
    logits = torch.tensor([1.0, 2.0])
    assert logits_to_probs(logits, 0.1, 1.0)[1] > logits_to_probs(logits, 1.0, 1.0)[1] > 0.5


class ByteTokenizer:
    """Each token is a few UTF-8 bytes; decoding shows broken characters as U+FFFD."""

    def __init__(self, pieces: dict[int, bytes]) -> None:
        self.pieces = pieces

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in token_ids).decode("utf-8", errors="replace")


def test_multibyte_characters_are_never_split() -> None:
    euro = "€".encode()  # three bytes, split over two tokens
    tokenizer = ByteTokenizer({1: b"Price ", 2: euro[:2], 3: euro[2:] + b"5", 4: b" ok"})
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(t) for t in (1, 2, 3, 4)] + [detokenizer.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == ""  # held until the character completes
    assert "".join(pieces) == "Price €5 ok"


def run_stops(stops: list[str], pushes: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(p) for p in pushes) + matcher.flush()
    return out, matcher.stopped


@pytest.mark.parametrize(
    ("stops", "pushes", "expected", "stopped"),
    [
        (["END"], ["abc END xyz"], "abc ", True),
        (["END"], ["abc E", "N", "D more"], "abc ", True),
        (["END"], ["abc EN", "Z"], "abc ENZ", False),
        (["b", "a"], ["xxab"], "xx", True),
        ([], ["plain"], "plain", False),
        (["\n\n"], ["one\n", "\ntwo"], "one", True),
    ],
)
def test_stop_sequences_cut_and_are_never_emitted(
    stops: list[str], pushes: list[str], expected: str, stopped: bool
) -> None:
    assert run_stops(stops, pushes) == (expected, stopped)


def test_a_partial_stop_is_held_back_until_resolved() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("go ST") == "go "
    assert matcher.push("AY") == "STAY"
