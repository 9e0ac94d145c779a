"""Where a result came from: the echofm version, the git commit (and whether the checkout had
uncommitted changes), a hash of the recipe and the versions of the packages the numbers
depend on. Every summary and results JSON carries `provenance(recipe)`; `echofm --version`
prints `version_line()`.

A leaf of the engine (it imports only yaml_io.py). Package versions are read from the
installed distributions' metadata, so nothing heavy is imported; the git state is asked of
`git` only when the code runs from a checkout (a `.git` beside engine/), never of a git
repository that merely contains an installed copy.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

from .yaml_io import to_dict

REPO = Path(__file__).resolve().parents[1]
"""The checkout root when the package is installed editable (engine/ lives in it)."""
PACKAGES = ("torch", "triton", "deepspeed", "numpy", "av")
"""Distributions whose versions change the numbers (DALI is added under `dali`)."""
DALI_DISTS = ("nvidia-dali-cuda130", "nvidia-dali-cuda120")


def version() -> str:
    """The installed echofm version ('unknown' when run from a copy that was never installed)."""
    try:
        return importlib.metadata.version("echofm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_state(root: Path = REPO) -> dict:
    """{"commit": full sha or None, "dirty": uncommitted changes to tracked files (None when
    unknown)}; None/None outside a checkout or without a `git` binary."""
    if not (root / ".git").exists():  # a worktree has a .git file, a clone a folder
        return {"commit": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    """{name: installed version or None} for PACKAGES, and `dali` ('2.4.0 (nvidia-dali-cuda130)')."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["dali"] = None
    for dist in DALI_DISTS:
        try:
            out["dali"] = f"{importlib.metadata.version(dist)} ({dist})"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def recipe_hash(recipe) -> str | None:
    """sha256 (16 hex) of the resolved recipe (a Recipe or its dict) as canonical JSON: two
    results with the same hash were produced by the same settings."""
    if recipe is None:
        return None
    data = json.dumps(to_dict(recipe), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def provenance(recipe=None) -> dict:
    """The provenance block of a summary / results JSON."""
    return {"echofm": version(), "git": git_state(), "recipe_sha256": recipe_hash(recipe),
            "python": platform.python_version(), "packages": package_versions()}


def version_line() -> str:
    """'echofm 0.1.0 (git 1a2b3c4d5e6f, uncommitted changes)' or 'echofm 0.1.0' outside a checkout."""
    g = git_state()
    if not g["commit"]:
        return f"echofm {version()}"
    return f"echofm {version()} (git {g['commit'][:12]}{', uncommitted changes' if g['dirty'] else ''})"
