"""Test-wide environment. Set before any kernel module is imported (PLATFORM.md)."""
import os

# Triton reads this when a kernel is decorated: CPU tensors run through its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed on its CPU accelerator (gloo); a single process also needs the rendezvous vars.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("LOCAL_RANK", "0")
# Deterministic, quiet CPU runs on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


# Small synthetic corpus shared by the data-path tests: 14 clips covering all views,
# grades, containers and splits, one clip < 32 frames, a two-view patient (test_synth checks).
SYNTH_CORPUS_CONFIG = dict(videos=14, seed=3, min_size=128, max_size=160, min_frames=40,
                           max_frames=64, short_fraction=0.1, avi_fraction=0.2, dicom_fraction=0.1)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory):
    """A small synthetic echo corpus (labels.csv, videos/, masks/), built once -> Path of DIR."""
    from echofm.loaders.synth import SynthConfig, make_corpus

    out = tmp_path_factory.mktemp("synth_corpus")
    make_corpus(out, SynthConfig(**SYNTH_CORPUS_CONFIG))
    return out


@pytest.fixture(scope="session")
def tiny_shards(synth_corpus, tmp_path_factory):
    """Shards of the `synth_corpus` fixture at 112x112, vp9 (built once per session) -> Path."""
    import warnings

    from echofm.loaders.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("tiny_shards")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size < 128 is intended for CPU tests
        report = ingest([synth_corpus], out, IngestConfig(size=112, codec="vp9", progress=False))
    assert report.added > 0, f"tiny_shards: nothing ingested from {synth_corpus}"
    return out
