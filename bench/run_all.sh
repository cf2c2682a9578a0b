#!/usr/bin/env bash
# Re-measures every figure the README quotes, records each run (one JSON line in
# bench/results/<bench>.jsonl, with date, commit, machine and command) and renders the
# README's tables from the records (bench/report.py --write).
#
# Run it on a quiet machine (nothing else on its cores: the figures are speeds), from a
# clean checkout of the commit to measure. About 30 minutes on the project's 2-core CI
# machine; the estimate of each step is beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
echo "run_all: load average $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2

# A bench that fails is reported at the end; the others still run (and record).
failed=()
run() {
  echo "run_all: $(date -u +%H:%M:%S) $*" >&2
  "$PY" "$@" --record >/dev/null || failed+=("$*")
}

run bench/fit.py                                            # seconds: computed from configs
run bench/planner.py                                        # ~10 s
run bench/head.py --device cpu --repeats 5 --screen         # ~2 min: a 4.2 GB fp32 head
run bench/precision.py --repeats 5 --greedy-tokens 16       # ~4 min: six precisions
run bench/decode.py                                         # ~2 min
run bench/concurrency.py                                    # ~3 min
run bench/wan.py --rtt-ms 20 100                            # ~5 min: six swarms
run bench/speculative.py                                    # ~8 min: nine swarms
run bench/affinity.py                                       # ~2 min
run bench/failover.py --fault kill                          # ~4 min
run bench/failover.py --fault hang                          # ~4 min

# Fine-tuning: the tiny Llama of the tests (4 blocks, hidden 64) and SmolLM2, ~3 min.
ALL7=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
TINY=bench/logs/tiny-llama
"$PY" -c "import sys; from pathlib import Path; from tests.tiny_model import build_tiny_llama
build_tiny_llama(Path(sys.argv[1]))" "$TINY"
run bench/finetune.py --model "$TINY" --targets "$ALL7"
run bench/finetune.py --model smollm2
run bench/finetune.py --model smollm2 --targets "$ALL7"

"$PY" bench/report.py --write
echo "run_all: done at $(date -u +%H:%M:%S); README.md's tables are rendered: review and commit" \
  "bench/results/ and README.md" >&2
if ((${#failed[@]})); then
  printf 'run_all: failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
