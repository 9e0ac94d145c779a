#!/usr/bin/env bash
# One call on a lent GPU machine (its own image: python3 with torch + triton + pytest, no
# DALI/deepspeed/av, the project not installed): kernel and model tests compiled on CUDA
# tensors (fp32/fp16/bf16), then benchmarks/kernels.py and benchmarks/train.py (ViT-B/L bf16
# MFU fed from device tensors). Under 8 minutes; the short tables are last.
#
#   bash benchmarks/gpu_check.sh            # from the repo root (the device tool's cwd)
#
# Wheels for missing packages, if any, go in .whl/ (carried): installed to /tmp/site first.
# Results: $OUT/kernels_gpu.json and $OUT/gpu_check.log when $OUT is set (the device tool
# returns $OUT), else benchmarks/results/.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${OUT:-$REPO/benchmarks/results}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
PY="${PYTHON:-python3}"
# Compiled kernels (the tests' conftest only setdefaults it); TRITON_INTERPRET=1 PYTHON=.venv/bin/python
# runs this same script on a CPU-only machine through the interpreter, to check the script.
export PYTHONUNBUFFERED=1 TRITON_INTERPRET="${TRITON_INTERPRET:-0}"

# The repo's folders kernels/, engine/, loaders/ import as echofm.* (setup.py maps them).
# Without installing, a shim package whose __path__ holds the repo root does the same.
SHIM="$(mktemp -d)"
mkdir -p "$SHIM/echofm"
cat > "$SHIM/echofm/__init__.py" <<EOF
"""Import shim for gpu_check.sh: echofm.<folder> resolves to $REPO/<folder>."""
__path__ = ["$REPO/echofm", "$REPO"]
exec(open("$REPO/echofm/__init__.py").read())
EOF
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
echo "== gpu_check $(date -u +%FT%TZ)"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
# Run from the shim dir: `python -m` puts the cwd first on sys.path, and the repo root's own
# echofm/ (without the subfolders) must not shadow the shim.
cd "$SHIM" || exit 1
"$PY" -c "import torch, triton, echofm, echofm.kernels as k; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.cuda.is_available(), 'echofm from', echofm.__file__, 'kernels from', k.__file__)" || exit 1

XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)  # compiles in parallel: ~60 kernel variants
echo "== kernel tests (compiled, CUDA tensors)"
timeout 170 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" --durations=5 \
    "$REPO/tests/test_gather.py" "$REPO/tests/test_attention.py" \
    "$REPO/tests/test_masking.py" "$REPO/tests/test_model.py" "$REPO/tests/test_losses.py"
TESTS_RC=$?

echo "== benchmarks"
timeout 190 "$PY" "$REPO/benchmarks/kernels.py" --out "$RESULTS/kernels_gpu.json"
BENCH_RC=$?
timeout 110 "$PY" "$REPO/benchmarks/train.py" --out "$RESULTS/train_gpu.json"
TRAIN_RC=$?
echo "== gpu_check done: tests rc=$TESTS_RC, kernels rc=$BENCH_RC, train rc=$TRAIN_RC (results in $RESULTS)"
exit $((TESTS_RC || BENCH_RC || TRAIN_RC))
} 2>&1 | tee "$LOG"
