#!/usr/bin/env bash
# GPU kit, the side with a network: the wheels a GPU machine's image lacks, cut into parts
# that each fit one upload to it (benchmarks/gpu_kit_install.sh puts them together there).
#
#   bash benchmarks/gpu_kit.sh [--python 3.12] [--out .kit] [--part-mib N] [--glibc 2.34]
#                              [--have FILE] [--full] [--leave NAME=WHY ...] [--setup setup.py]
#   bash benchmarks/gpu_kit.sh pack --wheels DIR --out DIR --part-bytes N [--python X.Y] [--glibc X.Y]
#
# build (the default):
#   1. resolve: setup.py's install_requires and its `cuda13` extra (DALI; KIT_EXTRAS=a,b picks
#      other extras), then each wheel's Requires-Dist (markers evaluated
#      for the target Python on x86-64 Linux), minus what the target image already has
#      (IMAGE_PACKAGES below, or --have FILE: one name per line, e.g. `pip list --format=freeze`
#      there) and minus LEAVE_OUT (each with its reason; --full keeps them, --leave adds one).
#      Versions: the one installed in this repo's .venv (the tested combination) when it
#      satisfies the requirement, else the newest that does.
#   2. download: cp<python> manylinux wheels (glibc <= --glibc) into OUT/cp<ver>/wheels; a
#      package with no wheel (deepspeed: an sdist) is built here with `pip wheel --no-deps`
#      and must come out pure (py3-none-any).
#   3. pack: the wheels as one reproducible tar, cut into parts of at most --part-mib (default:
#      64 MiB minus this repo's tree, which travels with every upload, minus a 2 MiB margin).
#      Part k goes to OUT/cp<ver>/partKK/ with a copy of kit-manifest.txt (sha256 and size of
#      every part and every wheel, the image packages the kit relies on, what it leaves out).
# Copy one part folder to the GPU machine per upload (<= 64 MiB with the repo tree) and run
# `bash benchmarks/gpu_kit_install.sh PART_DIR` there each time; the call that completes the
# set installs everything into /tmp/site. KIT_PIP_ARGS adds pip options (e.g. --no-index
# --find-links DIR, as the tests do).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UPLOAD_MIB=64   # what one upload to the GPU machine may carry: repo tree + carried paths
MARGIN_MIB=2    # room for the tree to grow (results, logs) between building and using the kit

# The GPU machine's image (its `pip list`, 2026-11-17: Python 3.12, torch 2.11+cu130). Names only.
IMAGE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp"

# Required on paper, not needed by anything this project runs: left out (with their own
# requirements, unless something else needs those). --full keeps them.
LEAVE_OUT=(
    "nvidia-nvimgcodec-cu13=DALI dlopens it for its image decoders only; the video graph needs the driver's libnvcuvid instead"
    "nvidia-libnvcomp-cu13=DALI dlopens it for fn.experimental.inflate only"
)

die() { echo "gpu_kit: $*" >&2; exit 2; }

PY="${KIT_PY:-}"
if [[ -z "$PY" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then
        PY="$REPO/.venv/bin/python"
    else
        PY=python3
        echo "gpu_kit: warning: no $REPO/.venv (make install): versions are the newest that satisfy setup.py, not the tested ones" >&2
    fi
fi

# Bytes of what travels with every upload: tracked + untracked-not-ignored files (and a
# shared/ folder inside the checkout, which travels too).
tree_bytes() {
    local n=0
    if git -C "$REPO" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
        n=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
            | du --files0-from=- -cb 2> /dev/null | tail -1 | cut -f1)
    fi
    if [[ -d "$REPO/shared" ]]; then
        n=$((n + $(du -sb "$REPO/shared" | cut -f1)))
    fi
    echo "${n:-0}"
}

# resolve + download: writes the chosen wheels to WHEELS and the kit's `uses`/`leave` lines
# to WHEELS/../resolve.txt.
resolve() {  # PYVER GLIBC WHEELS HAVE_FILE FULL
    local leave=()
    [[ "$5" == 1 ]] || leave=("${LEAVE_OUT[@]}")
    leave+=("${EXTRA_LEAVE[@]}")
    "$PY" - "$SETUP" "$1" "$2" "$3" "$4" "${leave[@]}" <<'PYEOF'
import ast, email.parser, importlib.metadata, os, re, shlex, shutil, subprocess, sys, tempfile, zipfile
from pathlib import Path
try:
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import parse_wheel_filename

setup_py, pyver, glibc, wheels, have_file, *leave_args = sys.argv[1:]
wheels = Path(wheels)
wheels.mkdir(parents=True, exist_ok=True)
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731  (PEP 503)
have = {norm(line.split("==")[0].split()[0]) for line in Path(have_file).read_text().splitlines()
        if line.strip() and not line.startswith("#")}
leave = dict(a.split("=", 1) for a in leave_args)
leave = {norm(k): v for k, v in leave.items()}
env = {"python_version": pyver, "python_full_version": pyver + ".0", "implementation_name": "cpython",
       "implementation_version": pyver + ".0", "platform_python_implementation": "CPython",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "os_name": "posix", "platform_release": "", "platform_version": ""}
major, minor = (int(x) for x in glibc.split("."))
platforms = [f"manylinux_{major}_{n}_x86_64" for n in range(minor, 16, -1)] + [
    "manylinux2014_x86_64", "manylinux1_x86_64"]
pip_extra = shlex.split(os.environ.get("KIT_PIP_ARGS", ""))


def roots():
    """install_requires plus the DALI extra for the GPU image's CUDA 13 driver (KIT_EXTRAS)."""
    kw = {n.arg: ast.literal_eval(n.value) for n in ast.walk(ast.parse(Path(setup_py).read_text()))
          if isinstance(n, ast.keyword) and n.arg in ("install_requires", "extras_require")}
    if "install_requires" not in kw:
        sys.exit(f"gpu_kit: {setup_py}: no install_requires=[...] list literal")
    extra = [r for e in os.environ.get("KIT_EXTRAS", "cuda13").split(",") if e
             for r in kw.get("extras_require", {}).get(e, [])]
    return [Requirement(r) for r in kw["install_requires"] + extra]


def wanted(req, extras):
    return req.marker is None or any(req.marker.evaluate(dict(env, extra=e)) for e in {""} | extras)


def pin(req):
    """'name==v' when this interpreter has a version satisfying req (the tested one), else req."""
    try:
        v = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return f"{req.name}{req.specifier}"
    return f"{req.name}=={v}" if req.specifier.contains(v, prereleases=True) else f"{req.name}{req.specifier}"


def cached(req):
    for w in wheels.glob("*.whl"):
        name, ver, _, _ = parse_wheel_filename(w.name)
        if norm(name) == norm(req.name) and req.specifier.contains(str(ver), prereleases=True):
            return w
    return None


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def fetch(req):
    spec = pin(req)
    with tempfile.TemporaryDirectory(dir=wheels.parent) as tmp:
        plat = [a for p in platforms for a in ("--platform", p)]
        r = run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                 "--python-version", pyver, "--implementation", "cp", *plat, "-d", tmp, spec, *pip_extra])
        how = "wheel"
        if r.returncode != 0:  # no binary for the target: build a pure wheel from the sdist
            r2 = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, spec, *pip_extra])
            if r2.returncode != 0:
                sys.exit(f"gpu_kit: {spec}: no cp{pyver} manylinux (glibc <= {glibc}) wheel and no "
                         f"sdist that builds:\n{r.stderr.strip()}\n{r2.stderr.strip()}")
            how = "built from sdist"
        (w,) = Path(tmp).glob("*.whl")
        if how != "wheel" and not w.name.endswith("-none-any.whl"):
            sys.exit(f"gpu_kit: {spec}: the sdist built {w.name}, which is tied to this machine's "
                     f"Python; the target needs a cp{pyver} wheel")
        dest = wheels / w.name
        shutil.move(str(w), dest)
        print(f"  {spec:40s} {how}: {w.name} ({dest.stat().st_size / 2**20:.1f} MiB)", flush=True)
        return dest


def requires(whl):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return [Requirement(r) for r in msg.get_all("Requires-Dist") or []]


chosen, uses, left = {}, {}, {}
queue = [(r, "setup.py") for r in roots()]
while queue:
    req, by = queue.pop(0)
    name = norm(req.name)
    if name in chosen:
        continue
    if name in have:
        uses.setdefault(name, (str(req.specifier) or "*", by))
        continue
    if name in leave:
        left.setdefault(name, by)
        continue
    whl = cached(req) or fetch(req)
    chosen[name] = whl
    extras = set(req.extras)
    queue += [(r, name) for r in requires(whl) if wanted(r, extras)]
for w in wheels.glob("*.whl"):  # a wheel from an earlier build that is no longer needed
    if w not in chosen.values():
        w.unlink()
with open(wheels.parent / "resolve.txt", "w") as f:
    for name, (spec, by) in sorted(uses.items()):
        f.write(f"uses {name} {spec} {by}\n")
    for name, by in sorted(left.items()):
        f.write(f"leave {name} {by}: {leave[name]}\n")
print(f"gpu_kit: {len(chosen)} wheels for Python {pyver}; relies on {len(uses)} image packages "
      f"({', '.join(sorted(uses))}); left out: {', '.join(sorted(left)) or 'nothing'}")
PYEOF
}

# pack WHEELS OUT PART_BYTES PYVER GLIBC [EXTRA_MANIFEST_FILE]: tar of the wheels -> parts +
# kit-manifest.txt in OUT and in every part folder.
pack() {
    local wheels="$1" out="$2" part_bytes="$3" pyver="$4" glibc="$5" extra="${6:-}"
    compgen -G "$wheels/*.whl" > /dev/null || die "$wheels: no wheels to pack"
    [[ "$part_bytes" =~ ^[0-9]+$ && "$part_bytes" -gt 0 ]] || die "part size must be a positive byte count, got '$part_bytes'"
    rm -rf "$out"/part[0-9][0-9] "$out/.stage"
    mkdir -p "$out/.stage"
    # Reproducible tar: same wheels -> same bytes -> same kit id.
    (cd "$wheels" && LC_ALL=C tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
        --format=gnu -cf - -- *.whl) | split -b "$part_bytes" -d -a 2 --numeric-suffixes=1 - "$out/.stage/kit.part"
    local parts=("$out"/.stage/kit.part*)
    local kit total
    kit=$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)
    total=$(cat "${parts[@]}" | wc -c)
    local m="$out/.stage/kit-manifest.txt"
    {
        echo "# echofm GPU kit (benchmarks/gpu_kit.sh): wheels the GPU image lacks, one tar cut in parts."
        echo "# On the GPU machine, per upload: bash benchmarks/gpu_kit_install.sh PART_DIR (the last installs)."
        echo "format 1"
        echo "kit $kit"
        echo "python $pyver"
        echo "glibc $glibc"
        echo "parts ${#parts[@]}"
        echo "bytes $total"
        for p in "${parts[@]}"; do
            echo "part $(stat -c %s "$p") $(sha256sum "$p" | cut -d' ' -f1) $(basename "$p")"
        done
        (cd "$wheels" && for w in *.whl; do echo "wheel $(stat -c %s "$w") $(sha256sum "$w" | cut -d' ' -f1) $w"; done)
        [[ -n "$extra" && -f "$extra" ]] && cat "$extra"
        true
    } > "$m"
    for p in "${parts[@]}"; do
        local k="${p##*kit.part}"
        mkdir -p "$out/part$k"
        mv "$p" "$out/part$k/"
        cp "$m" "$out/part$k/"
    done
    mv "$m" "$out/kit-manifest.txt"
    rmdir "$out/.stage"
    echo "gpu_kit: kit ${kit:0:12}: $(ls "$wheels"/*.whl | wc -l) wheels, $((total / 1048576)) MiB in ${#parts[@]} part(s) of <= $((part_bytes / 1048576)) MiB -> $out/part01 .. part$(printf %02d ${#parts[@]})"
}

# ---------------------------------------------------------------- arguments

CMD=build
if [[ "${1:-}" == pack || "${1:-}" == build ]]; then CMD="$1"; shift; fi
PYVER=3.12 GLIBC=2.34 OUT_ROOT="$REPO/.kit" PART_MIB="" PART_BYTES="" HAVE="" FULL=0 WHEELS=""
SETUP="$REPO/setup.py" EXTRA_LEAVE=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) PYVER="$2"; shift 2 ;;
        --glibc) GLIBC="$2"; shift 2 ;;
        --out) OUT_ROOT="$2"; shift 2 ;;
        --part-mib) PART_MIB="$2"; shift 2 ;;
        --part-bytes) PART_BYTES="$2"; shift 2 ;;
        --have) HAVE="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --full) FULL=1; shift ;;
        --leave) [[ "$2" == *=* ]] || die "--leave takes NAME=WHY"; EXTRA_LEAVE+=("$2"); shift 2 ;;
        --setup) SETUP="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || die "--python takes X.Y (e.g. 3.12), got '$PYVER'"
[[ "$GLIBC" =~ ^2\.[0-9]+$ ]] || die "--glibc takes 2.N (e.g. 2.34), got '$GLIBC'"

if [[ "$CMD" == pack ]]; then
    [[ -n "$WHEELS" && -n "$PART_BYTES" ]] || die "pack needs --wheels DIR --out DIR --part-bytes N"
    pack "$WHEELS" "$OUT_ROOT" "$PART_BYTES" "$PYVER" "$GLIBC"
    exit 0
fi

OUT="$OUT_ROOT/cp${PYVER/./}"
TREE=$(tree_bytes)
if [[ -z "$PART_MIB" ]]; then
    PART_BYTES=$(( (UPLOAD_MIB - MARGIN_MIB) * 1048576 - TREE ))
else
    PART_BYTES=$(( PART_MIB * 1048576 ))
fi
(( TREE + PART_BYTES <= UPLOAD_MIB * 1048576 )) || die "repo tree $((TREE / 1024)) KiB + parts of $PART_MIB MiB exceed one upload ($UPLOAD_MIB MiB)"
echo "gpu_kit: cp${PYVER/./}, glibc <= $GLIBC; repo tree $((TREE / 1024)) KiB travels with each upload -> parts of <= $((PART_BYTES / 1048576)) MiB"
HAVE_FILE="$(mktemp)"
trap 'rm -f "$HAVE_FILE"' EXIT
if [[ -n "$HAVE" ]]; then cp "$HAVE" "$HAVE_FILE"; else tr ' ' '\n' <<< "$IMAGE_PACKAGES" > "$HAVE_FILE"; fi
mkdir -p "$OUT/wheels"
resolve "$PYVER" "$GLIBC" "$OUT/wheels" "$HAVE_FILE" "$FULL"
pack "$OUT/wheels" "$OUT" "$PART_BYTES" "$PYVER" "$GLIBC" "$OUT/resolve.txt"
