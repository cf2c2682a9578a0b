"""What the benches share: the longest stall after a fault, the greedy check, a run's record."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import common


def test_the_longest_stall_counts_from_the_fault_not_from_the_next_chunk() -> None:
    # A step already under way delivers a token 0.1 s after the fault; the stall comes after.
    streamed = common.Streamed(started=0.0, times=[1.0, 2.0, 2.1, 4.6, 4.7])
    assert streamed.longest_gap_from(2.0) == pytest.approx(2.5)
    assert streamed.longest_gap_from(4.0) == pytest.approx(0.6)  # the fault to the next chunk
    assert streamed.longest_gap_from(5.0) is None


def test_rates_count_usage_tokens_not_chunks() -> None:
    streamed = common.Streamed(started=0.0, times=[0.5, 1.5], completion_tokens=5)
    assert streamed.ttft_s == 0.5
    assert streamed.decode_tok_s == pytest.approx(4.0)


def test_greedy_check_names_the_first_answer_that_differs() -> None:
    assert common.greedy_check(["a", "b"], ["a", "b"])["greedy_equal"]
    checked = common.greedy_check(["a", "x"], ["a", "b"])
    assert not checked["greedy_equal"] and checked["greedy_unequal"] == 1
    assert checked["first_unequal"] == {"swarm": "x", "generate": "b"}


def test_record_appends_one_line_with_commit_machine_and_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr("sys.argv", ["bench/planner.py", "--servers", "20"])
    for _ in range(2):
        common.finish("planner", {"plans": 2}, argparse.Namespace(record=True))
    lines = (tmp_path / "planner.jsonl").read_text().splitlines()
    assert len(lines) == 2
    run = json.loads(lines[0])
    assert run["bench"] == "planner" and run["result"] == {"plans": 2}
    assert run["command"] == "python bench/planner.py --servers 20"
    assert len(run["commit"]) == 40 and run["machine"]["cores"]
    assert json.loads(capsys.readouterr().out.split("}\n", 1)[0] + "}") == {"plans": 2}
