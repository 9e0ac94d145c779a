"""The user-facing docs stay true: links resolve inside the repo, docs/recipes.md is what
the config dataclasses say, and docs/shards.md lists every field ingest writes."""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
REGENERATE = ".venv/bin/python -m echofm.engine.config_reference docs/recipes.md"

# Recipe keys whose defining class has no attribute docstring yet (their modules belong to
# other parts of the engine). The list may only shrink: a new key without one fails.
UNDESCRIBED = {"model.preset", "optim.betas", "optim.eps", "downstream.train_split",
               "downstream.val_split", "downstream.test_split"}


# ---------------------------------------------------------------- markdown helpers


def _strip_code(text: str) -> str:
    """Text without fenced code blocks and inline code spans (no links or headings there)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, spaces -> '-')."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _strip_code(path.read_text()))


def _table_names(path: Path, heading: str) -> dict[str, list[str]]:
    """{first-column name: the row's other cells} of the tables under `heading` (up to the
    next heading of the same or a higher level); names are the backticked first cells."""
    lines = path.read_text().splitlines()
    level = heading.split()[0]
    start = lines.index(heading)
    rows = {}
    for line in lines[start + 1:]:
        m = re.match(r"^(#+)\s", line)
        if m and len(m.group(1)) <= len(level):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells and cells[0].startswith("`"):
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = cells[1:]
    assert rows, f"{path.name}: no table rows under {heading!r}"
    return rows


# ---------------------------------------------------------------- links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve_inside_the_repo(page):
    text = page.read_text()
    assert "../shared" not in text, f"{page.name} points to ../shared, which users do not have"
    for word in ("DESIGN.md", "PLATFORM.md", "DESIGN §"):
        assert word not in text, f"{page.name} cites {word!r}, a document users do not have"
    for link in _links(page):
        if re.match(r"^[a-z]+:", link):  # http(s), mailto: not files
            continue
        target, _, anchor = link.partition("#")
        dest = (page.parent / target).resolve() if target else page
        assert dest.is_relative_to(ROOT), f"{page.name}: link {link!r} leaves the repository"
        assert dest.exists(), f"{page.name}: link {link!r} names a file that does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: link {link!r}: no heading #{anchor} in {dest.name}"


def test_readme_links_every_doc_page():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _links(ROOT / "README.md")}
    index = {(DOCS / link.partition("#")[0]).resolve() for link in _links(DOCS / "index.md")}
    for page in sorted(DOCS.glob("*.md")):
        assert page in linked | index, f"docs/{page.name} is linked from neither README.md nor docs/index.md"
    assert DOCS / "index.md" in linked


# ---------------------------------------------------------------- recipe reference


def test_recipe_reference_is_current():
    from echofm.engine.config_reference import generate

    committed = (DOCS / "recipes.md").read_text()
    assert committed == generate(), f"docs/recipes.md is stale; regenerate it: {REGENERATE}"


def test_every_recipe_key_is_in_the_reference_with_a_description():
    import dataclasses
    import typing

    from echofm.engine.config import Recipe

    def keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    rows = {}
    for line in (DOCS / "recipes.md").read_text().splitlines():
        m = re.match(r"^\| `([\w.]+)` \| .* \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2).strip()
    every = set(keys(Recipe))
    nested = every - {"name"}
    assert nested <= set(rows), f"docs/recipes.md lacks {sorted(nested - set(rows))}; {REGENERATE}"
    empty = {k for k in nested if not rows[k]}
    assert empty <= UNDESCRIBED, (f"recipe keys without an attribute docstring: {sorted(empty - UNDESCRIBED)} "
                                  "(write one under the field, then regenerate)")
    assert UNDESCRIBED <= empty, f"now described, drop from UNDESCRIBED: {sorted(UNDESCRIBED - empty)}"


@dataclass(kw_only=True, slots=True)
class _Inner:
    """Inner things. Second sentence."""

    mode: Literal["a", "b"] = "a"
    """Mode | with a pipe."""
    ratio: float | None = None
    pair: tuple[int, int] = (1, 2)
    """A pair."""


@dataclass(kw_only=True, slots=True)
class _Outer:
    name: str = ""
    """The name."""
    inner: _Inner = field(default_factory=_Inner)
    tags: list[str] = field(default_factory=lambda: ["x"])
    """Tags."""


def test_reference_reads_docstrings_types_and_defaults():
    """The generator on a made-up recipe: nested sections, Literal / Optional / tuple types,
    default factories, a key without a docstring."""
    from echofm.engine.config_reference import generate

    text = generate(_Outer)
    assert "| `inner.mode` | `'a' \\| 'b'` | `a` | Mode \\| with a pipe. |" in text
    assert "| `inner.ratio` | `float \\| null` | `null` |  |" in text
    assert "| `inner.pair` | `tuple[int, int]` | `[1, 2]` | A pair. |" in text
    assert "Inner things. Second sentence." in text
    assert "| `name` | The name. (`str`, default `\"\"`) |" in text
    assert "`tags`" in text  # a non-dataclass field of the top level is listed, not a section


# ---------------------------------------------------------------- shard format


def _samples(shards: Path):
    from echofm.loaders.shards import iter_tar_samples

    m = json.loads((shards / "manifest.json").read_text())
    for s in m["shards"]:
        yield from iter_tar_samples(shards / s["tar"])


def test_every_sample_json_field_is_documented(tiny_shards):
    table = _table_names(DOCS / "shards.md", "## Sample json")
    optional = {k for k, cells in table.items() if "optional" in cells[0]}
    written = set()
    for key, comp in _samples(tiny_shards):
        meta = json.loads(comp["json"])
        written |= set(meta)
        missing = set(table) - optional - set(meta)
        assert not missing, f"docs/shards.md says every sample json has {sorted(missing)}; {key} lacks them"
    assert written <= set(table), (f"ingest writes sample json fields that docs/shards.md (## Sample json) "
                                   f"does not document: {sorted(written - set(table))}")
    assert "seg_frames" in written  # the fixture has masks: the optional field is exercised


def test_every_component_and_codec_extension_is_documented(tiny_shards):
    from echofm.loaders.video_io import CODECS

    table = _table_names(DOCS / "shards.md", "## Components of a sample")
    members = {ext for _, comp in _samples(tiny_shards) for ext in comp}
    assert members <= set(table), f"undocumented sample components: {sorted(members - set(table))}"
    exts = {c.ext for c in CODECS.values()}
    assert exts <= set(table), f"undocumented video extensions: {sorted(exts - set(table))}"


def test_every_manifest_field_is_documented(tiny_shards):
    m = json.loads((tiny_shards / "manifest.json").read_text())
    written = (set(m) | {f"shards[].{k}" for s in m["shards"] for k in s}
               | {f"settings.{k}" for k in m["settings"]})
    table = set(_table_names(DOCS / "shards.md", "## manifest.json"))
    assert written == table, (f"manifest.json fields vs docs/shards.md: undocumented {sorted(written - table)}, "
                              f"documented but not written {sorted(table - written)}")


def test_every_sample_list_field_is_documented(tiny_shards):
    m = json.loads((tiny_shards / "manifest.json").read_text())
    written = set()
    for s in m["shards"]:
        for line in (tiny_shards / s["samples_file"]).read_text().splitlines():
            written |= set(json.loads(line))
    table = set(_table_names(DOCS / "shards.md", "## shard-NNNNNN.samples.jsonl"))
    assert written == table, (f"samples.jsonl fields vs docs/shards.md: undocumented {sorted(written - table)}, "
                              f"documented but not written {sorted(table - written)}")


def test_every_reject_field_is_documented(tmp_path):
    from echofm.loaders.ingest import IngestConfig, ingest

    bad = tmp_path / "src" / "broken.mp4"
    bad.parent.mkdir()
    bad.write_bytes(b"not a video" * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ingest([bad.parent], tmp_path / "shards", IngestConfig(size=64, progress=False))
    assert report.rejected == 1
    (line,) = (tmp_path / "shards" / "rejects.jsonl").read_text().splitlines()
    written = set(json.loads(line))
    table = set(_table_names(DOCS / "shards.md", "## rejects.jsonl"))
    assert written == table, f"rejects.jsonl fields vs docs/shards.md: {sorted(written ^ table)}"


def test_csv_path_columns_are_documented():
    from echofm.loaders.sources.csv import PATH_COLUMNS

    table = _table_names(DOCS / "shards.md", "### CSV manifest")
    assert set(PATH_COLUMNS) <= set(table), f"undocumented CSV path columns: {sorted(set(PATH_COLUMNS) - set(table))}"
