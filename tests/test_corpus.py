"""The synthetic corpus -> shards cache (loaders/corpus.py): keyed by every setting that changes
the output and by the code that writes it; never silently reused for another config.

Regression: the benchmarks' and the demo's caches were keyed by a folder name (or by the
video count alone), so a changed SynthConfig reused a corpus made from other settings."""
import json

import pytest

from echofm.loaders import corpus
from echofm.loaders.errors import DataError
from echofm.loaders.ingest import IngestConfig
from echofm.loaders.synth import SynthConfig


def test_keys_follow_output_settings_and_code():
    a = corpus.spec_of(SynthConfig(videos=4, seed=0, workers=1))
    assert corpus.spec_of(SynthConfig(videos=4, seed=0, workers=2)) == a  # speed settings: the same corpus
    assert corpus.key_of(corpus.spec_of(SynthConfig(videos=4, seed=1))) != corpus.key_of(a)
    assert corpus.key_of(corpus.spec_of(SynthConfig(videos=4, seed=0, min_size=200))) != corpus.key_of(a)
    assert corpus.key_of(corpus.spec_of(IngestConfig(size=112))) != corpus.key_of(corpus.spec_of(IngestConfig(size=128)))
    assert corpus.spec_of(IngestConfig(size=112, progress=False)) == corpus.spec_of(IngestConfig(size=112))
    digest = corpus.code_digest(corpus.INGEST_CODE)
    assert len(digest) == 64 and digest != corpus.code_digest(corpus.SYNTH_CODE)
    assert corpus.code_digest(("sources",)) != corpus.code_digest(())  # a package's files count


def test_a_folder_is_reused_only_for_its_own_spec(tmp_path):
    built = []

    def build(path):
        built.append(path.name)
        (path / "data").write_text(str(len(built)))

    spec = {"synth": {"videos": 4}, "code": "x"}
    folder = corpus._ensure(tmp_path / "corpus", spec, build)
    assert corpus._ensure(tmp_path / "corpus", spec, build) == folder and built == ["corpus"]  # reused
    corpus._ensure(tmp_path / "corpus", dict(spec, code="changed"), build)  # other code: rebuilt in place
    assert built == ["corpus", "corpus"] and (folder / "data").read_text() == "2"
    # a build that died half-way (spec recorded, not complete) is built again
    state = json.loads((folder / corpus.SPEC).read_text())
    (folder / corpus.SPEC).write_text(json.dumps(dict(state, complete=False)))
    corpus._ensure(folder, dict(spec, code="changed"), build)
    assert len(built) == 3
    # a folder we did not make is refused, not overwritten
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "labels.csv").write_text("mine")
    with pytest.raises(DataError, match=rf"theirs: exists and was not built by .* \(no {corpus.SPEC}\)"):
        corpus._ensure(theirs, spec, build)
    assert (theirs / "labels.csv").read_text() == "mine"


def test_cached_corpus_builds_once_per_config(tmp_path, monkeypatch):
    synth = SynthConfig(videos=2, seed=0, min_size=128, max_size=128, min_frames=24, max_frames=24,
                        avi_fraction=0.0, dicom_fraction=0.0, short_fraction=0.0)
    ingest = IngestConfig(size=64, codec="mjpeg", progress=False)
    shards = corpus.cached_corpus(synth, ingest, tmp_path, log=lambda _m: None)
    assert (shards / "manifest.json").is_file() and shards.name.startswith("shards_64_2_")
    import echofm.loaders.synth as synth_pkg

    monkeypatch.setattr(synth_pkg, "make_corpus", lambda *a, **k: pytest.fail("rebuilt the corpus"))
    assert corpus.cached_corpus(synth, ingest, tmp_path, log=lambda _m: None) == shards
    other = corpus.cached_corpus(synth, IngestConfig(size=32, codec="mjpeg", progress=False), tmp_path,
                            log=lambda _m: None)  # same corpus (not rebuilt), other shards
    assert other != shards and json.loads((other / "manifest.json").read_text())["height"] == 32


def test_synthetic_shards_get_the_same_patient_ids_in_every_cache(tmp_path):
    """Regression: each fresh build drew a random id key, so the patient hashes, and with them
    the seeded label-fraction draw over patients, changed between two runs of the demo."""
    def synth(seed):
        return SynthConfig(videos=6, seed=seed, min_size=128, max_size=128, min_frames=24, max_frames=24,
                           avi_fraction=0.0, dicom_fraction=0.0, short_fraction=0.0)

    ingest = IngestConfig(size=32, codec="mjpeg", progress=False)

    def patients(cache, seed=0):
        shards = corpus.cached_corpus(synth(seed), ingest, cache, log=lambda _m: None)
        rows = [json.loads(line) for f in sorted(shards.glob("*.samples.jsonl")) for line in f.read_text().splitlines()]
        return sorted((r["key"], r["patient"]) for r in rows)

    a = patients(tmp_path / "a")
    assert len({p for _, p in a}) >= 2 and a == patients(tmp_path / "b")
    other = {p for _, p in patients(tmp_path / "a", seed=1)}  # another corpus: its own key
    keys = {f.read_text() for f in (tmp_path / "a").glob("*.idkey")}
    assert len(keys) == 2 and other
