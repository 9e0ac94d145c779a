"""Test-wide environment. Set before any kernel module is imported (Triton reads TRITON_INTERPRET at import)."""
import os
from pathlib import Path

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
def corpus_cache(tmp_path_factory):
    """Where the session's synthetic corpora and shards are built (loaders/corpus.py: keyed by
    their full config and code). ECHOFM_TEST_CACHE=DIR keeps them across sessions."""
    return Path(os.environ.get("ECHOFM_TEST_CACHE") or tmp_path_factory.mktemp("corpus_cache"))


@pytest.fixture(scope="session")
def synth_corpus(corpus_cache):
    """A small synthetic echo corpus (labels.csv, videos/, masks/), built once -> Path of DIR."""
    from echofm.loaders.corpus import cached_synth
    from echofm.loaders.synth import SynthConfig

    return cached_synth(SynthConfig(**SYNTH_CORPUS_CONFIG), corpus_cache, log=lambda _m: None)


@pytest.fixture(scope="session")
def tiny_shards(corpus_cache):
    """Shards of the `synth_corpus` fixture at 112x112, vp9 (built once per session) -> Path."""
    from echofm.loaders.corpus import cached_corpus
    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.synth import SynthConfig

    return cached_corpus(SynthConfig(**SYNTH_CORPUS_CONFIG), IngestConfig(size=112, codec="vp9", progress=False),
                         corpus_cache, log=lambda _m: None)


@pytest.fixture()
def one_torch_thread():
    """Tiny model shapes: one intra-op thread is faster and steadier on a shared 2-core
    machine (modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu(reason=...): needs a CUDA GPU; skipped, with the reason, where "
                            "there is none")
    config.addinivalue_line("markers", "slow(reason=...): minutes on 2 CPU cores; runs only with ECHOFM_SLOW=1")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip without CUDA and `slow` ones without ECHOFM_SLOW=1, each saying why."""
    import torch

    cuda, slow = torch.cuda.is_available(), bool(os.environ.get("ECHOFM_SLOW"))
    for item in items:
        mark = item.get_closest_marker("gpu")
        if mark is not None and not cuda:
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU: {mark.kwargs.get('reason', 'GPU-only path')}"))
        mark = item.get_closest_marker("slow")
        if mark is not None and not slow:
            item.add_marker(pytest.mark.skip(reason=f"slow ({mark.kwargs.get('reason', 'minutes on CPU')}); "
                                                    "set ECHOFM_SLOW=1 to run it"))
