"""Recipes: the typed config dataclasses of every layer composed into one `Recipe`.

Every component owns its `Config` dataclass (the stream owns `StreamConfig`, the model
`ModelConfig`, ...); this module composes them into a `Recipe`, loads it from YAML
(yaml_io.py: includes, --set overrides, strict types, errors naming file and key) and holds
the checks that span sections (`Recipe.validate`), which every entry point runs before
DeepSpeed starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from echofm.loaders.stream import StreamConfig

from .distributed import DeepSpeedConfig
from .downstream_config import DownstreamConfig
from .errors import ConfigError
from .logging import LoggingConfig
from .losses import LossConfig
from .masking import MaskConfig
from .model import ModelConfig
from .optim import OptimConfig, ScheduleConfig
from .resources import recipe_names, resolve_recipe
from .trainer import TrainConfig
from .yaml_io import apply_overrides, dump_yaml, from_dict, read_yaml, to_dict

__all__ = ["ConfigError", "Recipe", "dump_yaml", "load_recipe", "recipe_from_data", "recipe_names", "to_dict"]


@dataclass(kw_only=True, slots=True)
class Recipe:
    """One run: data, model, masking, losses, optimisation, engine, logging, downstream."""

    name: str = "unnamed"
    """Run name; also the default output sub-folder."""
    data: StreamConfig = field(default_factory=StreamConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)

    def validate(self, backbone: ModelConfig | None = None, *, what: str = "the model") -> None:
        """Checks that no single section can make; ConfigError naming the keys.

        The clips the data section cuts must fit `backbone` (default: this recipe's model
        section; a downstream run passes the config of the backbone it loaded, `what` names
        it), and data.shards must be set. Every entry point (pretrain, finetune, evaluate,
        export, demo) runs it before DeepSpeed starts; loading checks each section only, so
        a partial recipe can be loaded, shown and completed with --set."""
        m = (backbone or self.model).resolved()
        d = self.data
        if (d.num_frames, d.size) != (m.num_frames, m.img_size):
            wrong = [f"data.{k}={a} but {what} expects model.{n}={b}"
                     for k, a, n, b in (("num_frames", d.num_frames, "num_frames", m.num_frames),
                                        ("size", d.size, "img_size", m.img_size)) if a != b]
            raise ConfigError("; ".join(wrong) + "; set both to the same value")
        if not d.shards:
            raise ConfigError("data.shards: empty; set it to a shard folder written by `echofm ingest`")


def load_recipe(path: str | Path, overrides: list[str] | None = None, *,
                require: tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML (with includes), apply `--set` overrides, check every section
    (the cross-section checks are `Recipe.validate`). `path` is a file or a shipped
    preset's name (`echofm_tiny`, `ef_regression`; `echofm config list`). `require`: dotted
    keys the file or --set must give themselves (their defaults would run the wrong job)."""
    path = resolve_recipe(path)
    data = apply_overrides(read_yaml(path), overrides or [])
    missing = [k for k in require if not _has_key(data, k)]
    if missing:
        raise ConfigError(f"{path}: does not set {' or '.join(missing)}, so it is not a downstream recipe (a "
                          "pretrain one?); name a downstream recipe (`echofm config list`, e.g. synthetic_ef) or "
                          "add --set downstream.task=view|ef|grade|seg --set downstream.backbone=EXPORT_DIR")
    return from_dict(Recipe, data, file=str(path), validate=False)


def _has_key(data: dict, dotted: str) -> bool:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def recipe_from_data(data: dict, file: str = "<dict>") -> Recipe:
    """An in-memory mapping (e.g. the recipe stored in a checkpoint) -> Recipe, sections checked."""
    return from_dict(Recipe, data, file=file, validate=False)
