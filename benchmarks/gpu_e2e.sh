#!/usr/bin/env bash
# The whole system on one GPU in one call (benchmarks/gpu_e2e.py says what each stage does):
# NVDEC check, synthetic corpus + ingest (VP9, H.264, 224^2), the DALI stream (mixed vs cpu,
# stride 2 and 1), `echofm pretrain` ViT-B bf16 through DeepSpeed, checkpoint + resume, and
# the same trainer fed from GPU memory. Under 8 minutes on an H200; the table is last.
#
#   bash benchmarks/gpu_e2e.sh [--cpu] [--work DIR] [--budget SECONDS] [--site DIR] [--only STAGES]
#
# On the GPU machine, after benchmarks/gpu_kit_install.sh has put DALI, DeepSpeed, PyAV ...
# into /tmp/site (--site; added to PYTHONPATH). The project is not installed there: a shim
# package maps echofm.<folder> to this checkout (as gpu_check.sh does). --cpu: the same
# stages at a tiny scale on a CPU-only machine (VP9, echofm_tiny), to test this script.
# Each stage runs under its own timeout, cut to what is left of --budget (default 450 s, x4
# with --cpu; a reserve keeps the report); WORK (default /tmp/echofm_e2e) keeps the corpus and shards, so
# a rerun on a warm machine skips them; --only pretrain,resume (comma list) reruns just those
# stages (plus preflight and report), keeping the other stages' results of the last call. Results: $OUT/gpu_e2e.json + gpu_e2e.log when $OUT is
# set (the device tool returns $OUT), else benchmarks/results/ (gpu_e2e_cpu.* with --cpu).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=() WORK="" BUDGET="" SITE=/tmp/site ONLY=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) MODE=(--cpu); shift ;;
        --work) WORK="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --site) SITE="$2"; shift 2 ;;
        --only) ONLY=",$2,"; shift 2 ;;
        -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_e2e: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
CPU=${MODE[0]:-}
# The CPU twin runs on small shared machines (2 cores): longer stage limits, same stages.
SCALE=1
[[ -n "$CPU" ]] && SCALE=4
BUDGET="${BUDGET:-$((450 * SCALE))}"
WORK="${WORK:-/tmp/echofm_e2e${CPU:+_cpu}}"
RESULTS="${OUT:-$REPO/benchmarks/results}"
LOG="$RESULTS/gpu_e2e${CPU:+_cpu}.log"
if [[ -z "${PYTHON:-}" && -n "$CPU" && -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; fi
PY="${PYTHON:-python3}"
mkdir -p "$RESULTS" "$WORK/stages"
if [[ -z "$ONLY" ]]; then   # this call's stages only (corpus and shards stay)
    rm -f "$WORK"/stages/*.json "$WORK"/stages/rc_*
fi

export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TRITON_INTERPRET="${TRITON_INTERPRET:-0}"
if [[ -n "$CPU" ]]; then
    export DS_ACCELERATOR=cpu   # (CPU tensors take the kernels' torch path)
fi
SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/echofm"
cat > "$SHIM/echofm/__init__.py" <<EOF
"""Import shim for gpu_e2e.sh: echofm.<folder> resolves to $REPO/<folder>."""
__path__ = ["$REPO/echofm", "$REPO"]
exec(open("$REPO/echofm/__init__.py").read())
EOF
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
[[ -d "$SITE" ]] && export PYTHONPATH="$PYTHONPATH:$SITE"
# `python -m` puts the cwd first on sys.path: run from the shim so the repo's own echofm/
# (without the code folders) does not shadow it.
cd "$SHIM" || exit 1

START=$SECONDS
RESERVE=20   # for the report
stage() {  # NAME LIMIT_S
    if [[ -n "$ONLY" && "$ONLY" != *",$1,"* && "$1" != preflight && "$1" != report ]]; then return; fi
    local left=$((BUDGET - (SECONDS - START) - RESERVE)) limit=$(($2 * SCALE))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "== stage $1 skipped: $((SECONDS - START)) s of the $BUDGET s budget used"
        echo 124 > "$WORK/stages/rc_$1"
        return
    fi
    timeout -k 10 "$limit" "$PY" "$REPO/benchmarks/gpu_e2e.py" "$1" --work "$WORK" --results "$RESULTS" "${MODE[@]}"
    local rc=$?
    echo "$rc" > "$WORK/stages/rc_$1"
    ((rc == 0)) || echo "== stage $1: rc $rc$( ((rc == 124 || rc == 137)) && echo " (timed out after $limit s)")"
}

{
echo "== gpu_e2e ${CPU:-gpu} $(date -u +%FT%TZ): repo $REPO, work $WORK, budget $BUDGET s, python $PY"
stage preflight 60
stage corpus 150
stage stream 120
stage pretrain 150
stage resume 90
stage replay 120
BUDGET=$((BUDGET + RESERVE)) stage report 30
echo "== gpu_e2e done in $((SECONDS - START)) s; log $LOG"
} 2>&1 | tee ${ONLY:+-a} "$LOG"   # a partial rerun appends to the log of the full run
failed=$(grep -L '^0$' "$WORK"/stages/rc_* 2> /dev/null | wc -l)
exit $((failed > 0))
