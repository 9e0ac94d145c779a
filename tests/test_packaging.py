"""What the install promises: the shards are plain WebDataset, setup.py's requirements are
bounded and hold what the tests run on, DALI comes as a CUDA-matched extra, and the
Makefile installs extras that exist."""
from __future__ import annotations

import ast
import importlib.metadata
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TESTED_TORCH = ("2.11", "2.13")
"""torch versions the project was tested on: the GPU image's kernel and model tests, this suite."""
DALI_EXTRAS = {"cuda13": "nvidia-dali-cuda130", "cuda12": "nvidia-dali-cuda120"}


def _setup_literals() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    """install_requires and extras_require as setup.py writes them (literals, read with ast:
    benchmarks/gpu_kit.sh reads them the same way)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    kw = {k.arg: k.value for n in ast.walk(tree) if isinstance(n, ast.Call)
          for k in n.keywords if k.arg in ("install_requires", "extras_require")}
    reqs = [Requirement(r) for r in ast.literal_eval(kw["install_requires"])]
    extras = {name: [Requirement(r) for r in rs] for name, rs in ast.literal_eval(kw["extras_require"]).items()}
    return reqs, extras


# ---------------------------------------------------------------- the shards are WebDataset


def test_webdataset_reads_our_shards_as_we_do(tiny_shards):
    """webdataset.WebDataset groups the tar into the same samples (keys, members, bytes, order)
    as our reader and the DALI index; its decoder gives the json and the masks back."""
    wds = pytest.importorskip("webdataset", reason="webdataset is a test dependency: pip install -e '.[dev]'")
    from echofm.loaders.shards import iter_tar_samples, read_index

    m = json.loads((tiny_shards / "manifest.json").read_text())
    n = 0
    for s in m["shards"]:
        tar = str(tiny_shards / s["tar"])
        theirs = list(wds.WebDataset(tar, shardshuffle=False))
        ours = list(iter_tar_samples(tar))
        indexed = [comps[0][3].partition(".")[0] for comps in read_index(tiny_shards / s["idx"])]
        assert [t["__key__"] for t in theirs] == [k for k, _ in ours] == indexed
        for t, (key, comp) in zip(theirs, ours):
            assert {e: v for e, v in t.items() if not e.startswith("__")} == comp, key
        for t, (key, comp) in zip(wds.WebDataset(tar, shardshuffle=False).decode(), ours):
            assert t["json"] == json.loads(comp["json"]), key
            assert int(np.frombuffer(t["nframes"], "<i4")[0]) == t["json"]["frames"]
            if "seg.npy" in comp:
                want = np.load(io.BytesIO(comp["seg.npy"]))
                assert t["seg.npy"].dtype == np.uint8 and np.array_equal(t["seg.npy"], want), key
        n += len(ours)
    assert n == m["total_samples"]


# ---------------------------------------------------------------- setup.py


def test_every_requirement_has_an_upper_bound():
    reqs, extras = _setup_literals()
    for r in reqs + [r for rs in extras.values() for r in rs]:
        assert any(sp.operator in ("<", "<=", "==", "~=") for sp in r.specifier), \
            f"setup.py: {r} has no upper bound (cap it at the next untested release)"


def test_torch_range_is_the_tested_one():
    reqs, _ = _setup_literals()
    (torch_req,) = [r for r in reqs if r.name == "torch"]
    floors = [Version(sp.version) for sp in torch_req.specifier if sp.operator == ">="]
    assert floors and min(floors) >= Version(TESTED_TORCH[0]), \
        f"setup.py claims {torch_req}; the oldest torch tested is {TESTED_TORCH[0]}"
    for v in TESTED_TORCH:
        assert torch_req.specifier.contains(f"{v}.0"), f"setup.py's {torch_req} excludes tested torch {v}"


def test_dali_is_an_extra_per_cuda_major():
    reqs, extras = _setup_literals()
    assert not [r for r in reqs if r.name.startswith("nvidia-dali")], "DALI must not be hard-wired"
    specs = set()
    for extra, name in DALI_EXTRAS.items():
        (r,) = extras[extra]
        assert r.name == name, f"extra {extra!r} installs {r.name}, expected {name}"
        specs.add(str(r.specifier))
    assert len(specs) == 1, f"the DALI extras ask for different releases: {specs}"


def test_no_caps_that_only_a_dependency_needs_and_no_unused_extras():
    reqs, extras = _setup_literals()
    names = {r.name for r in reqs} | {r.name for rs in extras.values() for r in rs}
    assert "packaging" not in names, "packaging's cap is DALI's own requirement; pip resolves it"
    assert "xformers" not in names and "xformers" not in extras, "xformers is not installed by any extra"
    assert "webdataset" in {r.name for r in extras["dev"]}, "the WebDataset test needs it"
    assert "webdataset" not in {r.name for r in reqs}, "nothing at run time imports webdataset"


def test_installed_versions_satisfy_setup():
    """What this environment runs the tests with lies inside setup.py's ranges."""
    reqs, extras = _setup_literals()
    wanted = reqs + extras["dev"] + [r for e in DALI_EXTRAS for r in extras[e]]
    checked = 0
    for r in wanted:
        try:
            v = importlib.metadata.version(r.name)
        except importlib.metadata.PackageNotFoundError:
            assert r.name.startswith("nvidia-dali"), f"{r.name} is required but not installed"
            continue
        assert r.specifier.contains(v, prereleases=True), f"installed {r.name} {v} is outside setup.py's {r}"
        checked += 1
    assert checked >= len(reqs) + 1, "no DALI build is installed: pip install -e '.[dev,cuda13]'"


def test_makefile_installs_existing_extras_and_the_tested_torch():
    reqs, extras = _setup_literals()
    make = (ROOT / "Makefile").read_text()
    (spec,) = re.findall(r"pip install -q -e '\.\[([\w,]+)\]'", make)
    assert set(spec.split(",")) <= set(extras), f"Makefile installs unknown extras {spec}"
    assert "dev" in spec.split(",") and set(spec.split(",")) & set(DALI_EXTRAS), spec
    (torch_pin,) = re.findall(r"pip install -q torch==([\d.]+)", make)
    (torch_req,) = [r for r in reqs if r.name == "torch"]
    assert torch_req.specifier.contains(torch_pin), f"Makefile's torch {torch_pin} is outside setup.py's {torch_req}"


def test_a_hung_test_fails_instead_of_stalling_ci():
    """Regression (CI ran out of its 90 minutes on one hung test): pytest.ini sets a per-test
    timeout, and the plugin that enforces it is a dev dependency and loaded."""
    import configparser

    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    assert 60 <= int(ini["pytest"]["timeout"]) <= 900
    _, extras = _setup_literals()
    assert "pytest-timeout" in {r.name for r in extras["dev"]}
    importlib.metadata.version("pytest-timeout")


def test_dev_extra_installs_the_real_tracker_clients():
    """tests/test_trackers.py runs W&B and MLflow for real: the dev extra carries what the
    `wandb` and `mlflow` extras install, at the same bounds (MLflow 3's default sqlite store
    needs SQLAlchemy and alembic beside mlflow-skinny)."""
    _, extras = _setup_literals()
    dev = {r.name: str(r.specifier) for r in extras["dev"]}
    for extra in ("wandb", "mlflow"):
        for r in extras[extra]:
            assert dev.get(r.name) == str(r.specifier), f"dev extra lacks {r} (from the {extra} extra)"
    assert {"sqlalchemy", "alembic"} <= {r.name for r in extras["mlflow"]}
