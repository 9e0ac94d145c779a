"""EchoFM: echocardiography video foundation model and its pretraining engine.

The Python API (docs/api.md), imported on first use so that `import echofm` stays cheap
(no torch, no DALI until a name below is touched):

    from echofm import EchoFM
    model = EchoFM.from_pretrained("demo_out/export")      # eval mode, CPU
    tokens, cls, phase = model.encode(video)                # video uint8 [B, T, H, W, 3]

- `EchoFM`: the model (`from_pretrained`, `encode`, `save_pretrained`).
- `load_official`: an official EchoFM checkpoint (.pth) -> EchoFM.
- `load_backbone`: any backbone spec `echofm finetune` accepts (export dir, training
  checkpoint, official or VideoMAE file, 'random') -> (EchoFM in eval mode, info).
- `Recipe`, `load_recipe`, `recipe_names`: recipes (a file or a shipped preset's name).
- `ClipStream`, `StreamConfig`: shards -> uint8 clip batches.
- `export`, `embed`, `EmbedConfig`, `neighbours`: what the commands of the same name do.

The code lives in three folders installed as subpackages: `echofm.loaders` (ingest,
shards, DALI stream), `echofm.kernels` (Triton kernels and torch references) and
`echofm.engine` (model, losses, trainer, downstream). Layers import one way only:
kernels and loaders import nothing of ours; engine imports both.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "EchoFM": "echofm.engine.model",
    "ModelConfig": "echofm.engine.model",
    "load_official": "echofm.engine.adapters",
    "load_backbone": "echofm.engine.downstream.backbone",
    "Recipe": "echofm.engine.config",
    "load_recipe": "echofm.engine.config",
    "recipe_names": "echofm.engine.config",
    "ClipStream": "echofm.loaders.stream",
    "StreamConfig": "echofm.loaders.stream",
    "export": "echofm.engine.export",
    "embed": "echofm.engine.embed",
    "EmbedConfig": "echofm.engine.embed",
    "neighbours": "echofm.engine.embed",
    "UserError": "echofm.engine.errors",
}
"""Public name -> the module that defines it (imported when the name is first read)."""

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'echofm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
