"""EchoFM: echocardiography video foundation model and its pretraining engine.

The code lives in three folders installed as subpackages: `echofm.loaders` (ingest,
shards, DALI stream), `echofm.kernels` (Triton kernels and torch references) and
`echofm.engine` (model, losses, trainer, downstream). Layers import one way only:
kernels and loaders import nothing of ours; engine imports both.
"""
__version__ = "0.1.0"
