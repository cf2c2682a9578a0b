"""The README's benchmark tables, rendered from the recorded runs in ``bench/results/``.

Each bench appends one JSON line per run with ``--record`` (``bench/common.py``). This
renders each bench's table (Markdown) from those lines, every row naming its run
(``file:line``) and the commit it ran at, and puts it in README.md between the markers
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``. A unit test checks the README's tables
equal what this renders, so a figure can't drift from its run.

    python bench/report.py            # print the tables
    python bench/report.py --write    # put them into README.md
    python bench/report.py --check    # exit 1 if README.md's tables differ
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"

Record = dict[str, Any]
Row = list[str]


def records(bench: str, results: Path = RESULTS) -> list[tuple[str, Record]]:
    """Each recorded run of ``bench`` with its name, ``bench.jsonl:LINE``."""
    path = results / f"{bench}.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [(f"{path.name}:{n}", json.loads(line)) for n, line in enumerate(lines, 1) if line]


def num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def run_cell(name: str, record: Record) -> str:
    commit = (record.get("commit") or "")[:7] or "?"
    return f"{name} ({commit}{', dirty' if record.get('dirty') else ''})"


def date(record: Record) -> str:
    return str(record.get("date", ""))[:10]


def table(header: list[str], rows: list[Row]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- one renderer per bench ---------------------------------------------------------------


def decode(runs: list[tuple[str, Record]]) -> str:
    rows = []
    for name, record in runs:
        r = record["result"]
        rows.append(
            [
                run_cell(name, record),
                date(record),
                f"{r['model']} ({r['device']})",
                str(r["prompt_tokens"]),
                str(r["max_tokens"]),
                num(r["hf"]["decode_tok_s"], 1),
                num(r["swarm"]["decode_tok_s"], 1),
                f"**{num(r['decode_ratio'])}**",
                f"{num(r['hf']['ttft_s'], 3)} s",
                f"{num(r['swarm']['ttft_s'], 3)} s",
                ", ".join(str(c) for c in r.get("swarm_cached_tokens", [])),
                num(r.get("greedy_equal")),
            ]
        )
    header = ["run", "date", "model", "prompt", "tokens", "HF decode tok/s"]
    header += ["swarm decode tok/s", "ratio", "HF TTFT", "swarm TTFT", "cached"]
    return table([*header, "= generate"], rows)


def concurrency(runs: list[tuple[str, Record]]) -> str:
    rows = []
    for name, record in runs:
        r = record["result"]
        levels = [r["swarm"][str(c)] for c in r["streams"]]
        top = r["streams"][-1]
        speedups = [num(level["speedup_vs_1"]) for level in levels]
        speedups[-1] = f"**{speedups[-1]}**"
        alarms = r.get("alarms", {})
        rows.append(
            [
                run_cell(name, record),
                date(record),
                f"{r['model']} ({r['device']})",
                " / ".join(str(c) for c in r["streams"]),
                " / ".join(num(level["tok_s"], 1) for level in levels),
                " / ".join(speedups),
                " / ".join(num(level["ttft_p50_s"]) for level in levels) + " s",
                " / ".join(num(level["ttft_p99_s"]) for level in levels) + " s",
                str(sum(level["failures"] for level in levels)),
                f"{num(r['hf']['batch_1']['tok_s'], 1)} (batch 1), "
                f"{num(r['hf'][f'batch_{top}']['tok_s'], 1)} (batch {top})",
                " / ".join(num(alarms.get(k), 0) for k in sorted(alarms)) or "-",
            ]
        )
    header = ["run", "date", "model", "streams", "swarm tok/s", "vs 1 stream", "TTFT p50"]
    header += ["TTFT p99", "failed", "HF generate tok/s", "failovers / hung servers"]
    return table(header, rows)


def wan(runs: list[tuple[str, Record]]) -> str:
    labels = {"relay": "gateway relay", "push": "node push"}
    rows = []
    for name, record in runs:
        r = record["result"]
        for rtt, by_mode in r["rtt"].items():
            for mode in r["modes"]:
                m = by_mode[mode]
                extra = "-"
                if float(rtt) > 0:
                    extra = (
                        f"{m['extra_ms_per_token']:.0f} ({m['expected_extra_ms_per_token']:.0f})"
                    )
                pvr = by_mode.get("push_vs_relay") if mode == "push" else None
                rows.append(
                    [
                        run_cell(name, record),
                        date(record),
                        r["model"],
                        labels[mode],
                        f"{rtt} ms",
                        f"{num(m['ttft_s'])} s",
                        num(m["decode_tok_s"], 1),
                        f"{m['decode_ms_per_token']:.0f}",
                        extra,
                        f"**{num(pvr['decode_tok_s'])}**, {num(pvr['ttft_s'])}" if pvr else "-",
                    ]
                )
    header = ["run", "date", "model", "mode", "RTT per hop", "TTFT", "decode tok/s"]
    header += ["ms per token", "extra ms per token (expected)", "push / relay: tok/s, TTFT"]
    return table(header, rows)


def speculative(runs: list[tuple[str, Record]]) -> str:
    """The single streams of the latest run over the most round trips (18 rows a run; a
    shorter run, at 0 ms only, re-measures the streams at once), then 16 streams at once in
    every run that measured them (so a fix shows beside what it fixed)."""
    rows = []
    widest = max(len(record["result"]["rtt"]) for _, record in runs)
    full = [(n, record) for n, record in runs if len(record["result"]["rtt"]) == widest]
    for name, record in full[-1:]:
        r = record["result"]
        draft = r.get("draft") or {}
        setup = [draft.get("model", "")]
        if draft.get("quantization", "none") != "none":
            setup.append(draft["quantization"])
        if draft.get("layers"):
            setup.append(f"{draft['layers']} blocks")
        labels = {"draft": f"draft ({', '.join(setup)})"}
        for rtt, by_task in r["rtt"].items():
            for task, by_mode in by_task.items():
                for mode in r["modes"]:
                    m = by_mode[mode]
                    ratio = num(m["vs_off"]["decode_tok_s"])
                    accepted = "-"
                    if m["draft_tokens"]:
                        accepted = (
                            f"{m['draft_tokens_accepted']} of {m['draft_tokens']} "
                            f"({100 * m['acceptance']:.0f}%)"
                        )
                    rows.append(
                        [
                            run_cell(name, record),
                            date(record),
                            r["model"],
                            task,
                            f"{rtt} ms",
                            labels.get(mode, mode),
                            num(m["decode_tok_s"], 1),
                            ratio if mode == "off" else f"**{ratio}**",
                            f"{num(m['ttft_s'])} s",
                            num(m["tokens_per_pass"]),
                            accepted,
                            num(m["identical"]),
                        ]
                    )
    header = ["run", "date", "model", "task", "RTT per hop", "speculation", "decode tok/s"]
    header += ["x off", "TTFT", "tokens per drafted pass", "drafts accepted", "= off"]
    together = []
    for name, record in runs:
        r = record["result"]
        if not r.get("concurrent"):
            continue  # runs from before it was measured
        for mode in r["modes"]:
            c = r["concurrent"][mode]
            together.append(
                [
                    run_cell(name, record),
                    date(record),
                    str(c["streams"]),
                    mode,
                    num(c["tok_s"], 1),
                    num(c["vs_off"]) if mode == "off" else f"**{num(c['vs_off'])}**",
                    str(c["draft_tokens"]),
                    str(c["failures"]),
                ]
            )
    if not together:
        return table(header, rows)
    header_together = ["run", "date", "streams at once (0 ms)", "speculation", "tok/s"]
    header_together += ["x off", "drafts verified", "failures"]
    return table(header, rows) + "\n\n" + table(header_together, together)


def affinity(runs: list[tuple[str, Record]]) -> str:
    rows = []
    for name, record in runs:
        r = record["result"]
        shared = r["shared_system_prompt"]
        rows.append(
            [
                run_cell(name, record),
                date(record),
                r["model"],
                f"{r['history_tokens']} tokens",
                ", ".join(str(c) for c in r["cached_tokens_on_hit"]),
                f"{num(r['ttft_hit_s'])} s",
                f"{num(r['ttft_miss_s'])} s",
                f"**{num(r['hit_over_miss'])}**",
                f"{shared['turns'][1]['cached_tokens']} of {shared['system_prompt_tokens']}",
                num(shared["min_own_history_reused"]),
                num(r.get("greedy_equal")),
            ]
        )
    header = ["run", "date", "model", "history", "cached on hit", "TTFT hit", "TTFT miss"]
    header += ["hit / miss", "B1 reused of the system prompt", "least own history reused"]
    return table([*header, "= generate"], rows)


def failover(runs: list[tuple[str, Record]]) -> str:
    rows = []
    for name, record in runs:
        r = record["result"]
        for hop in ("first", "last"):
            if hop not in r:
                continue
            h = r[hop]
            rows.append(
                [
                    run_cell(name, record),
                    date(record),
                    r["model"],
                    f"{r['fault']}, {hop} hop",
                    f"**{num(h['stall_s'])} s**",
                    f"{num(h['stall_s_max'])} s",
                    f"{num(h['baseline_stall_s'])} s",
                    f"{num(h['resume_s'])} s",
                    num(h["slowdown"]),
                    num(h["identical"]),
                    num(r.get("greedy_equal")),
                ]
            )
    header = ["run", "date", "model", "fault", "longest stall", "worst stall"]
    header += ["undisturbed", "fault → next token", "slowdown", "= undisturbed", "= generate"]
    return table(header, rows)


def precision(runs: list[tuple[str, Record]]) -> str:
    rows = []
    for name, record in runs:
        r = record["result"]
        questions = r["greedy_questions"]
        for label, p in r["precisions"].items():
            accuracy = [
                num(p.get("rel_logit_error"), 3),
                f"{100 * p['top1_agreement']:.0f}%" if "top1_agreement" in p else "-",
                (
                    f"{round(p['greedy_identical'] * questions)}/{questions}"
                    if "greedy_identical" in p
                    else "-"
                ),
                num(p.get("greedy_common_prefix"), 1),
            ]
            rows.append(
                [
                    run_cell(name, record),
                    date(record),
                    r["model"],
                    label,
                    f"{p['block_bytes'] / 1e6:.2f} MB",
                    num(p["bytes_ratio"]),
                    num(p["decode_tok_s"], 1),
                    num(p["speed_ratio"]),
                    *accuracy,
                ]
            )
    header = ["run", "date", "model", "precision", "bytes per block", "vs fp32"]
    header += ["decode tok/s (span)", "vs fp32", "rel. logit error", "top-1 match"]
    return table([*header, "greedy answers equal", "shared prefix"], rows)


def head(runs: list[tuple[str, Record]]) -> str:
    names = {"llama-3-70b": "Llama-3-70B", "smollm2": "SmolLM2"}
    rows = []
    for name, record in runs:
        r = record["result"]
        by = {(x["head"], x["dtype"], x["batch"]): x for x in r["results"]}
        for (head_name, dtype, batch), x in by.items():
            if batch != 1 or (head_name, dtype, 16) not in by:
                continue
            many = by[head_name, dtype, 16]
            vocab, hidden = x["shape"]
            rows.append(
                [
                    run_cell(name, record),
                    date(record),
                    r["device"],
                    f"{names.get(head_name, head_name)}, {vocab:,} x {hidden:,}",
                    f"{dtype} ({x['weight_gb'] * 1000:.0f} MB)",
                    f"{x['call_s'] * 1000:.1f}",
                    f"{many['call_s'] * 1000:.1f} ({many['per_row_s'] * 1000:.2f})",
                    (
                        f"{x['screen_call_s'] * 1000:.0f} / {many['screen_call_s'] * 1000:.0f}"
                        if "screen_call_s" in x
                        else "-"
                    ),
                ]
            )
    header = ["run", "date", "device", "head", "dtype (weights)", "batch 1: ms per token"]
    return table([*header, "batch 16: ms per call (per row)", "fp32 greedy screen: ms"], rows)


def fit(runs: list[tuple[str, Record]]) -> str:
    """The latest run only: computed from configs, every run of the same code agrees."""
    if not runs:
        return ""
    name, record = runs[-1]
    rows_in = record["result"]["rows"]
    gpus = sorted({row["gpu_gb"] for row in rows_in})
    rows = []
    for model in dict.fromkeys(row["model"] for row in rows_in):
        for quant in ("bf16", "nf4"):
            mine = [x for x in rows_in if x["model"] == model and x["quant"] == quant]
            cells = [
                f"{x['blocks']} of {x['of']} ({x['kv_tokens'] // 1000}k KV tokens)" for x in mine
            ]
            rows.append([model, quant, f"{mine[0]['block_mb']:.0f} MB", *cells])
    header = ["model", "weights", "block", *(f"{g:g} GB GPU" for g in gpus)]
    return table(header, rows) + f"\n\n(Run {run_cell(name, record)}.)"


def finetune(runs: list[tuple[str, Record]]) -> str:
    rows = []
    for name, record in runs:
        r = record["result"]
        rows.append(
            [
                run_cell(name, record),
                date(record),
                f"{r['model']} ({r['nodes'] or 'a running swarm of'} nodes)",
                f"r {r['rank']}, {r['targets'].replace(',', '/')}",
                f"{r['batch_size']} x {r['length']}",
                num(r["seconds_per_step"]),
                f"{r['bytes_sent_per_step'] / 1e6:.2f} MB",
                f"{r['bytes_received_per_step'] / 1e6:.2f} MB",
            ]
        )
    header = ["run", "date", "model", "LoRA", "batch", "s/step", "sent/step", "received/step"]
    return table(header, rows)


def planner(runs: list[tuple[str, Record]]) -> str:
    rows = []
    for name, record in runs:
        r = record["result"]
        rows.append(
            [
                run_cell(name, record),
                date(record),
                f"{r['servers']:,} servers, {r['blocks']} blocks",
                str(r["plans"]),
                f"{r['plan_ms_median']} / {r['plan_ms_p99']} ms",
                f"{r['route_hops_min']}-{r['route_hops_max']}",
                f"{r['dht_largest_key_bytes'] / 1e3:.0f} kB",
            ]
        )
    header = ["run", "date", "swarm", "plans", "plan: median / p99", "route hops"]
    return table([*header, "largest DHT key"], rows)


RENDERERS: dict[str, Callable[[list[tuple[str, Record]]], str]] = {
    "decode": decode,
    "concurrency": concurrency,
    "wan": wan,
    "speculative": speculative,
    "affinity": affinity,
    "failover": failover,
    "precision": precision,
    "head": head,
    "fit": fit,
    "finetune": finetune,
    "planner": planner,
}
NONE_YET = "_No run recorded yet: `bench/run_all.sh` records one._"


def render(bench: str, results: Path = RESULTS) -> str:
    runs = records(bench, results)
    return RENDERERS[bench](runs) if runs else NONE_YET


# --- the README ---------------------------------------------------------------------------

BLOCK = re.compile(r"(<!-- bench:(\w+) -->\n)(?:(.*?)\n)??(<!-- /bench:\2 -->)", re.DOTALL)


def blocks(text: str) -> Iterator[tuple[str, str]]:
    """Each marked block of ``text``: the bench's name and what it holds."""
    for match in BLOCK.finditer(text):
        yield match[2], match[3] or ""


def rendered_readme(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked block holding its bench's rendered table."""
    return BLOCK.sub(lambda m: m[1] + render(m[2], results) + "\n" + m[4], text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="put the tables into README.md")
    action.add_argument("--check", action="store_true", help="exit 1 if README.md differs")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = rendered_readme(text)
    if args.write:
        README.write_text(new)
    elif args.check:
        if new != text:
            print("README.md's bench tables differ from bench/report.py's", file=sys.stderr)
            return 1
    else:
        for bench in RENDERERS:
            print(f"## {bench}\n\n{render(bench)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
