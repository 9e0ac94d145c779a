"""The model card `echofm export` writes as README.md beside the weights: what the model is
(architecture, objective), what it saw (the shard set by its manifest's sha256, the steps),
where it came from (checkpoint, echofm version and git commit, packages) and what it is for
and not for. Plain Markdown, built only from the checkpoint, its run folder and the shards'
manifest when that is reachable at export time."""
from __future__ import annotations

import json
from pathlib import Path

from echofm.loaders.digest import sha256_file

from .checkpoint import META, find_checkpoint
from .provenance import provenance
from .yaml_io import to_dict

CARD = "README.md"
"""The model card's file name in an export folder."""

INTENDED_USE = """\
## Intended use

Research on echocardiography video: a backbone whose clip, token and phase embeddings
(`EchoFM.encode`) feed downstream heads (view, EF, valve grade, segmentation; `echofm
finetune`), retrieval (`echofm embed`, `echofm neighbours`) or further pretraining.

## Limits

- Not a medical device and not validated for clinical use: no diagnosis, triage or
  treatment decision may rest on its outputs.
- It knows only the data listed above. Scanners, views, populations and frame rates that
  this shard set does not contain are out of distribution; measure on your own cohort
  (`echofm evaluate RUN --data SHARDS`) before relying on any number.
- A model pretrained on the synthetic corpus (`echofm synth`, `echofm demo`) has seen no
  real echocardiogram: it is a pipeline check, not a foundation model.
- Inputs must match the clip it was trained on: {frames} frames of {size} x {size} RGB,
  uint8 (or float in [0, 1]); the model normalises with the mean / std above.
"""


def data_section(shards: str) -> list[str]:
    """Markdown lines naming the shard set by its manifest's sha256 (and its size), or
    saying that the manifest was not reachable when the model was exported."""
    manifest = Path(shards) / "manifest.json" if shards else None
    if manifest is None or not manifest.is_file():
        return [f"- shards: `{shards or '(not set)'}` (manifest not reachable at export: digest unknown)"]
    m = json.loads(manifest.read_text())
    return [f"- shards: `{shards}`",
             f"- manifest.json sha256: `{sha256_file(manifest)}`",
             f"- {m.get('total_samples', '?')} samples, {m.get('total_frames', '?')} frames; "
             f"splits {json.dumps(m.get('splits', {}))}; codec {m.get('codec', '?')}, "
             f"{m.get('height', '?')} x {m.get('width', '?')}"]


def _run_summary(ckpt: Path) -> dict:
    """`<run>/summary.json` of the run the checkpoint belongs to ({} when absent)."""
    for folder in (ckpt.parent.parent, ckpt.parent):
        f = folder / "summary.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except ValueError:
                return {}
    return {}


def _kv(d: dict) -> list[str]:
    return [f"- `{k}`: `{json.dumps(v)}`" for k, v in d.items()]


def render(recipe, model, *, checkpoint: Path | None, step: int | None, weights_sha256: str) -> str:
    """The card's Markdown. recipe: the checkpoint's Recipe; model: the exported EchoFM."""
    m = model.cfg
    params = sum(p.numel() for p in model.parameters())
    summary = _run_summary(checkpoint) if checkpoint is not None else {}
    prov = summary.get("provenance") or provenance(recipe)
    git = prov.get("git") or {}
    lines = [f"# EchoFM model: {recipe.name}", "",
             "Exported by `echofm export`; load with `EchoFM.from_pretrained(\"<this folder>\")` "
             "(docs/api.md in the echofm repository).", "",
             "## Architecture", "",
             f"- video masked autoencoder (ViT), preset `{m.preset}`: {m.depth} layers, width {m.embed_dim}, "
             f"{m.num_heads} heads, {m.attention} attention; {params / 1e6:.1f} M parameters (with the MAE decoder)",
             f"- input: {m.num_frames} frames x {m.img_size} x {m.img_size} x {m.in_chans}, patch {m.patch_size}, "
             f"tubelet {m.tubelet}; mean {list(m.mean)}, std {list(m.std)}",
             "- outputs (`encode`): tokens [B, N, D], cls [B, D], phase embeddings [B, T', D]", "",
             "## Objective", "",
             f"- masking: {recipe.mask.kind}, ratio {recipe.mask.ratio}",
             "- loss (the recipe's `loss:` section):", *("  " + x for x in _kv(to_dict(recipe.loss))), "",
             "## Data", "", *data_section(recipe.data.shards),
             f"- clips: {recipe.data.num_frames} frames, stride {recipe.data.stride}, "
             f"{recipe.data.size} x {recipe.data.size}", "",
             "## Training", "",
             f"- optimizer steps: {step if step is not None else summary.get('steps', 'unknown')}"
             + f" of {recipe.train.steps}",
             f"- checkpoint: `{checkpoint}`" if checkpoint is not None else "- checkpoint: unknown",
             f"- model.safetensors sha256: `{weights_sha256}`", "",
             "## Provenance", "",
             f"- echofm {prov.get('echofm')}, git commit {git.get('commit') or 'unknown'}"
             + (" (uncommitted changes)" if git.get("dirty") else ""),
             f"- recipe sha256 (16 hex): {prov.get('recipe_sha256')}; python {prov.get('python')}",
             f"- packages: {json.dumps(prov.get('packages', {}))}", "",
             INTENDED_USE.format(frames=m.num_frames, size=m.img_size)]
    return "\n".join(lines)


def write_card(out_dir: Path, recipe, model, source: str | Path) -> Path:
    """Write `out_dir/README.md` for the model exported from `source` (the checkpoint, run
    or checkpoints folder `echofm export` was given)."""
    # The newest complete checkpoint, unhashed: the one load_model_state loaded unless that
    # one was damaged (it then said so and fell back); hashing it again would double the cost.
    ckpt = find_checkpoint(source)
    step = None
    if ckpt is not None and (ckpt / META).is_file():
        step = json.loads((ckpt / META).read_text()).get("step")
    text = render(recipe, model, checkpoint=ckpt, step=step,
                  weights_sha256=sha256_file(out_dir / "model.safetensors"))
    path = out_dir / CARD
    path.write_text(text)
    return path
