"""The README's benchmark tables are what bench/report.py renders from the committed runs in
bench/results/, so no figure there can drift from the run that measured it."""

from __future__ import annotations

import json
from pathlib import Path

from bench import report


def test_the_readmes_tables_are_rendered_from_the_recorded_runs() -> None:
    text = report.README.read_text()
    assert text == report.rendered_readme(text), "run `python bench/report.py --write`"


def test_every_bench_has_its_table_in_the_readme() -> None:
    marked = [name for name, _ in report.blocks(report.README.read_text())]
    assert sorted(marked) == sorted(report.RENDERERS)


def test_every_recorded_run_names_its_commit_machine_and_command() -> None:
    for path in sorted(report.RESULTS.glob("*.jsonl")):
        assert path.stem in report.RENDERERS, f"{path.name}: no table renders it"
        for n, line in enumerate(path.read_text().splitlines(), 1):
            run = json.loads(line)
            where = f"{path.name}:{n}"
            assert run["bench"] == path.stem, where
            assert len(run["commit"]) == 40, where
            assert run["machine"] and run["command"].startswith(f"python bench/{path.stem}.py")
            assert run["result"], where


def test_a_block_is_replaced_between_its_markers_only(tmp_path: Path) -> None:
    (tmp_path / "planner.jsonl").write_text("")
    text = "before\n<!-- bench:planner -->\nold figures\n<!-- /bench:planner -->\nafter\n"
    assert report.rendered_readme(text, tmp_path) == (
        f"before\n<!-- bench:planner -->\n{report.NONE_YET}\n<!-- /bench:planner -->\nafter\n"
    )
