"""The GPU kit (benchmarks/gpu_kit.sh, gpu_kit_install.sh) on small fake wheels, offline.

Checks the logic that a real kit relies on: the cut into parts of a given size, the manifest's
sha256 and sizes, that the parts put together give the wheels back, that install is
resumable over several calls and refuses a damaged part, and the dependency resolution
(markers, image packages, left-out packages) against a local folder of wheels.
"""
import hashlib
import io
import os
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "benchmarks" / "gpu_kit.sh"
INSTALL = REPO / "benchmarks" / "gpu_kit_install.sh"
PYVER = "%d.%d" % sys.version_info[:2]


def make_wheel(folder: Path, name: str, version: str = "1.0", payload: int = 0,
               requires: tuple[str, ...] = (), package: str = "") -> Path:
    """A minimal valid pure wheel: package `name` (or the dotted `package`) with
    VALUE = '<name> <version>' and `payload` incompressible bytes, METADATA with the given
    Requires-Dist lines."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    pkg = package.replace(".", "/") or dist
    files = {
        f"{pkg}/__init__.py": f"VALUE = {name + ' ' + version!r}\n".encode(),
        f"{pkg}/blob.bin": random.Random(name).randbytes(payload),
        f"{info}/METADATA": ("Metadata-Version: 2.1\n"
                             f"Name: {name}\nVersion: {version}\n"
                             + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in [*files, f"{info}/RECORD"]).encode()
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for p, data in files.items():
            z.writestr(p, data)
    return path


def sh(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def manifest(path: Path) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, *rest = line.split()
            out.setdefault(key, []).append(rest)
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def kit(tmp_path):
    """Three fake wheels (~30 KB each) packed into 25,000-byte parts -> (wheels, kit dir)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("kitfake-alpha", "kitfake-beta", "kitfake-gamma"):
        make_wheel(wheels, name, payload=30_000)
    out = tmp_path / "kit"
    r = sh(KIT, "pack", "--wheels", wheels, "--out", out, "--part-bytes", 25_000, "--python", PYVER)
    assert r.returncode == 0, r.stderr
    return wheels, out


def test_pack_cuts_parts_and_manifest_matches(kit):
    wheels, out = kit
    m = manifest(out / "kit-manifest.txt")
    parts = sorted(out.glob("part*/kit.part*"))
    blob = b"".join(p.read_bytes() for p in parts)
    assert len(parts) == -(-len(blob) // 25_000) >= 4  # ceil: ~90 KB of wheels + tar headers
    assert all(p.stat().st_size == 25_000 for p in parts[:-1]) and 0 < parts[-1].stat().st_size <= 25_000
    assert m["kit"] == [[sha(blob)]] and m["parts"] == [[str(len(parts))]] and m["python"] == [[PYVER]]
    assert [row for row in m["part"]] == [[str(p.stat().st_size), sha(p.read_bytes()), p.name] for p in parts]
    for p in parts:  # every part folder carries the same manifest
        assert (p.parent / "kit-manifest.txt").read_text() == (out / "kit-manifest.txt").read_text()
    # The parts put together are a tar of exactly the wheels, and the manifest has their sha256.
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        got = {i.name: t.extractfile(i).read() for i in t.getmembers()}
    want = {w.name: w.read_bytes() for w in wheels.glob("*.whl")}
    assert got == want
    assert sorted(m["wheel"], key=lambda r: r[2]) == [[str(len(d)), sha(d), n] for n, d in sorted(want.items())]


def test_pack_is_reproducible(kit, tmp_path):
    wheels, out = kit
    again = tmp_path / "again"
    assert sh(KIT, "pack", "--wheels", wheels, "--out", again, "--part-bytes", 25_000,
              "--python", PYVER).returncode == 0
    assert manifest(again / "kit-manifest.txt")["kit"] == manifest(out / "kit-manifest.txt")["kit"]


def test_install_is_resumable_and_refuses_damaged_parts(kit, tmp_path):
    _, out = kit
    target, work = tmp_path / "site", tmp_path / "work"
    opts = ("--target", target, "--work", work)
    parts = sorted(out.glob("part*"))
    n = len(parts)
    r = sh(INSTALL, parts[0], *opts, env={"PYTHON": sys.executable})
    assert r.returncode == 10 and f"1 of {n} parts kept" in r.stdout, r.stdout + r.stderr
    r = sh(INSTALL, parts[0], *opts, env={"PYTHON": sys.executable})  # the same part again: no change
    assert r.returncode == 10 and f"1 of {n} parts kept" in r.stdout
    # A flipped byte and a cut-short copy are refused, and nothing of them is kept.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in parts[1].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    damaged = next(bad.glob("kit.part*"))
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    r = sh(INSTALL, bad, *opts, env={"PYTHON": sys.executable})
    assert r.returncode == 2 and "sha256" in r.stderr and "damaged" in r.stderr, r.stderr
    damaged.write_bytes(bytes(data[:-10]))
    r = sh(INSTALL, bad, *opts, env={"PYTHON": sys.executable})
    assert r.returncode == 2 and "bytes" in r.stderr, r.stderr
    (state,) = work.iterdir()  # one build
    assert sorted(p.name for p in state.glob("kit.part*")) == [next(parts[0].glob("kit.part*")).name]
    assert not target.exists()
    # The rest in one call (several folders): complete -> checked -> installed.
    r = sh(INSTALL, *parts[1:], *opts, env={"PYTHON": sys.executable})
    assert r.returncode == 0 and "3 wheels installed" in r.stdout, r.stdout + r.stderr
    probe = "import kitfake_alpha, kitfake_gamma; print(kitfake_alpha.VALUE, '|', kitfake_gamma.VALUE)"
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)}, cwd=tmp_path)
    assert got.stdout.strip() == "kitfake-alpha 1.0 | kitfake-gamma 1.0", got.stderr
    r = sh(INSTALL, parts[-1], *opts, env={"PYTHON": sys.executable})
    assert r.returncode == 0 and "already installed" in r.stdout


def test_install_refuses_a_kit_for_another_python(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "kitfake-alpha")
    out = tmp_path / "kit"
    assert sh(KIT, "pack", "--wheels", wheels, "--out", out, "--part-bytes", 1 << 20,
              "--python", "3.99").returncode == 0
    r = sh(INSTALL, out / "part01", "--target", tmp_path / "site", "--work", tmp_path / "w",
           env={"PYTHON": sys.executable})
    assert r.returncode == 2 and "Python 3.99" in r.stderr and "--python" in r.stderr, r.stderr


def test_resolve_follows_requirements_offline(tmp_path):
    """setup.py roots -> Requires-Dist closure, with markers for the target Python, minus the
    image's packages and the left-out ones; offline from a folder of wheels."""
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index, "kitfake-root", requires=(
        "kitfake-dep>=1.0", "kitfake-image", 'kitfake-old; python_version < "3.0"',
        'kitfake-extra; extra == "docs"', "kitfake-left"))
    make_wheel(index, "kitfake-dep", "1.2", requires=("kitfake-leaf",))
    make_wheel(index, "kitfake-leaf", "0.3")
    for name in ("kitfake-old", "kitfake-extra", "kitfake-left", "kitfake-image"):
        make_wheel(index, name)
    setup = tmp_path / "setup.py"
    setup.write_text('from setuptools import setup\nsetup(name="x", install_requires=["kitfake-root", "kitfake-image>=2"])\n')
    have = tmp_path / "have.txt"
    have.write_text("kitfake-image==3.0\n")
    out = tmp_path / "kit"
    r = sh(KIT, "--python", "3.12", "--out", out, "--part-mib", 1, "--have", have, "--setup", setup,
           "--leave", "kitfake-left=not needed here",
           env={"KIT_PIP_ARGS": f"--no-index --find-links {index}"})
    assert r.returncode == 0, r.stdout + r.stderr
    kit = out / "cp312"
    assert sorted(w.name for w in (kit / "wheels").glob("*.whl")) == [
        "kitfake_dep-1.2-py3-none-any.whl", "kitfake_leaf-0.3-py3-none-any.whl",
        "kitfake_root-1.0-py3-none-any.whl"]
    m = manifest(kit / "kit-manifest.txt")
    assert m["uses"] == [["kitfake-image", ">=2", "setup.py"]]
    assert m["leave"] == [["kitfake-left", "kitfake-root:", "not", "needed", "here"]]
    assert m["python"] == [["3.12"]] and len(m["wheel"]) == 3 and (kit / "part01" / "kit.part01").is_file()


def test_installed_namespace_portion_survives_a_regular_image_package(tmp_path):
    """nvidia.dali lands in TARGET as a portion of the `nvidia` namespace; an image whose
    site-packages has a regular nvidia/__init__.py must not hide it (nor lose its own)."""
    wheels, image = tmp_path / "wheels", tmp_path / "image"
    wheels.mkdir()
    make_wheel(wheels, "kitfake-ns", package="nvidia.kitfake_dali")
    (image / "nvidia" / "imagelib").mkdir(parents=True)
    (image / "nvidia" / "__init__.py").write_text("")
    (image / "nvidia" / "imagelib" / "__init__.py").write_text("VALUE = 'image'\n")
    out, target = tmp_path / "kit", tmp_path / "site"
    assert sh(KIT, "pack", "--wheels", wheels, "--out", out, "--part-bytes", 1 << 20,
              "--python", PYVER).returncode == 0
    r = sh(INSTALL, out / "part01", "--target", target, "--work", tmp_path / "w", env={"PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    probe = "import nvidia.kitfake_dali as a, nvidia.imagelib as b; print(a.VALUE, '|', b.VALUE)"
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{image}"})
    assert got.stdout.strip() == "kitfake-ns 1.0 | image", got.stderr


def test_parts_of_two_builds_do_not_mix(kit, tmp_path):
    """The same wheels cut at another part size: same kit id, other parts. Parts kept from
    one build must not complete the other."""
    wheels, out = kit
    other = tmp_path / "other"
    assert sh(KIT, "pack", "--wheels", wheels, "--out", other, "--part-bytes", 30_000,
              "--python", PYVER).returncode == 0
    assert manifest(other / "kit-manifest.txt")["kit"] == manifest(out / "kit-manifest.txt")["kit"]
    opts = ("--target", tmp_path / "site", "--work", tmp_path / "work")
    env = {"PYTHON": sys.executable}
    assert sh(INSTALL, out / "part01", *opts, env=env).returncode == 10
    r = sh(INSTALL, out / "part01", other / "part02", *opts, env=env)
    assert r.returncode == 2 and "another build" in r.stderr
    rest = sorted(other.glob("part*"))[1:]
    r = sh(INSTALL, *rest, *opts, env=env)  # other's part01 is still missing
    assert r.returncode == 10 and "still to come: kit.part01" in r.stdout, r.stdout + r.stderr
    r = sh(INSTALL, other / "part01", *opts, env=env)
    assert r.returncode == 0 and "3 wheels installed" in r.stdout, r.stdout + r.stderr
