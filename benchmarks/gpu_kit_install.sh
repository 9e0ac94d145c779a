#!/usr/bin/env bash
# GPU kit, the GPU machine's side: take the kit parts this upload carries, check them, keep
# them under /tmp until the set is complete, then install every wheel into one folder.
#
#   bash benchmarks/gpu_kit_install.sh PART_DIR [PART_DIR ...] [--target /tmp/site] [--work /tmp/echofm_kit]
#   export PYTHONPATH=/tmp/site     # afterwards (gpu_e2e.sh does it itself)
#
# PART_DIR is a partKK/ folder written by benchmarks/gpu_kit.sh (kit.partKK + kit-manifest.txt).
# Resumable across uploads: each call adds the parts it carries (sha256 and size checked on
# arrival: a damaged part is refused and not kept); the call that completes the set checks the
# whole stream and every wheel's sha256, then runs
# `pip install --no-index --no-deps --no-compile --target TARGET`. Parts live in
# WORK/<build>/ (the manifest's hash), so parts of two builds never mix.
# Exit: 0 installed (or already installed), 10 parts kept but some still to come, 2 refused.
# PYTHON (default python3) is the interpreter the wheels are for.
set -euo pipefail
TARGET=/tmp/site WORK=/tmp/echofm_kit PY="${PYTHON:-python3}"
DIRS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --target) TARGET="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) DIRS+=("$1"); shift ;;
    esac
done
die() { echo "gpu_kit_install: $*" >&2; exit 2; }
[[ ${#DIRS[@]} -gt 0 ]] || die "give at least one part folder (see --help)"
field() { awk -v k="$1" '$1 == k { print $2; exit }' "$2"; }

KIT="" BUILD="" STATE=""
for d in "${DIRS[@]}"; do
    m="$d/kit-manifest.txt"
    [[ -f "$m" ]] || die "$d: no kit-manifest.txt (is this a partKK folder from gpu_kit.sh?)"
    kit=$(field kit "$m")
    [[ "$kit" =~ ^[0-9a-f]{64}$ ]] || die "$m: no 'kit <sha256>' line"
    # Parts are kept per build (the manifest's hash), not per kit id: the same wheels cut at
    # another part size have the same kit id but other parts.
    build=$(sha256sum "$m" | cut -c1-16)
    [[ -z "$BUILD" || "$BUILD" == "$build" ]] || die "$d is from another build of the kit than ${DIRS[0]}: carry parts of one build"
    KIT="$kit" BUILD="$build" STATE="$WORK/$build"
    mkdir -p "$STATE"
    [[ -f "$STATE/kit-manifest.txt" ]] || cp "$m" "$STATE/kit-manifest.txt"
    found=0
    for p in "$d"/kit.part*; do
        [[ -e "$p" ]] || continue
        name=$(basename "$p")
        want_size="" want_sha=""
        read -r want_size want_sha < <(awk -v f="$name" '$1 == "part" && $4 == f { print $2, $3 }' "$m") || true
        [[ -n "$want_sha" ]] || die "$p: not listed in $m"
        size=$(stat -c %s "$p")
        [[ "$size" == "$want_size" ]] || die "$p: $size bytes, the manifest says $want_size: the copy is damaged or cut short; copy the part again"
        sha=$(sha256sum "$p" | cut -d' ' -f1)
        [[ "$sha" == "$want_sha" ]] || die "$p: sha256 $sha, the manifest says $want_sha: the part is damaged; copy it again from the kit gpu_kit.sh built"
        if [[ ! -f "$STATE/$name" ]]; then
            cp "$p" "$STATE/.$name.tmp" && mv "$STATE/.$name.tmp" "$STATE/$name"   # atomic: no half part is ever kept
        fi
        found=$((found + 1))
    done
    [[ $found -gt 0 ]] || die "$d: no kit.partKK file in it"
done

M="$STATE/kit-manifest.txt"
if [[ "$(cat "$TARGET/.echofm_kit" 2> /dev/null)" == "$KIT" ]]; then
    echo "gpu_kit_install: kit ${KIT:0:12} is already installed in $TARGET"
    exit 0
fi
missing=()
while read -r _ _ _ name; do
    [[ -f "$STATE/$name" ]] || missing+=("$name")
done < <(awk '$1 == "part"' "$M")
n=$(field parts "$M")
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "gpu_kit_install: kit ${KIT:0:12}: $((n - ${#missing[@]})) of $n parts kept in $STATE; still to come: ${missing[*]}"
    exit 10
fi

# The set is complete: check the interpreter, the whole stream and every wheel, then install.
t0=$(date +%s)
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "$PY: not runnable (set PYTHON)"
[[ "$pyver" == "$(field python "$M")" ]] || die "this kit holds wheels for Python $(field python "$M"), $PY is $pyver: build the kit with gpu_kit.sh --python $pyver"
parts=()
while read -r _ _ _ name; do parts+=("$STATE/$name"); done < <(awk '$1 == "part"' "$M")
sha=$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)
[[ "$sha" == "$KIT" ]] || die "the $n parts put together hash to $sha, not the kit id $KIT: delete $STATE and copy the parts again"
rm -rf "$STATE/wheels"
mkdir -p "$STATE/wheels"
cat "${parts[@]}" | tar -x -C "$STATE/wheels"
awk '$1 == "wheel" { print $3 "  " $4 }' "$M" > "$STATE/wheels.sha256"
(cd "$STATE/wheels" && sha256sum --quiet -c ../wheels.sha256) || die "a wheel does not match its sha256 (listed above): delete $STATE and copy the parts again"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" \
    "$STATE"/wheels/*.whl || die "pip install into $TARGET failed (output above)"
# nvidia.dali is a portion of the `nvidia` namespace. If the image's site-packages has a
# regular nvidia/__init__.py (some CUDA wheels ship one), it would win over the namespace
# portion in TARGET and hide nvidia.dali; a pkgutil-style __init__ here (TARGET comes first
# on PYTHONPATH) merges every nvidia/ folder on sys.path instead.
if [[ -d "$TARGET/nvidia" ]] && ! grep -q extend_path "$TARGET/nvidia/__init__.py" 2> /dev/null; then
    echo '__path__ = __import__("pkgutil").extend_path(__path__, __name__)  # gpu_kit_install.sh' >> "$TARGET/nvidia/__init__.py"
fi
echo "$KIT" > "$TARGET/.echofm_kit"
rm -rf "$STATE/wheels"
echo "gpu_kit_install: kit ${KIT:0:12}: $(awk '$1 == "wheel"' "$M" | wc -l) wheels installed into $TARGET in $(( $(date +%s) - t0 )) s; export PYTHONPATH=$TARGET"
# The image packages the kit relies on (a warning only: the image may name them differently).
absent=$(awk '$1 == "uses" { print $2 }' "$M" | PYTHONPATH="$TARGET" "$PY" -c '
import importlib.metadata as md, sys
def has(n):
    try:
        return bool(md.version(n))
    except md.PackageNotFoundError:
        return False
print(" ".join(n for n in sys.stdin.read().split() if not has(n)))')
[[ -z "$absent" ]] || echo "gpu_kit_install: warning: the kit expects these on the image, not found: $absent"
exit 0
