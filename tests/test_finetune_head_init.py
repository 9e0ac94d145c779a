"""finetune(head=...): LP-FT starts from the given head (the demo passes each backbone's
linear-probe head), not a fresh one; the caller's head object is what gets trained."""
import torch

from echofm.engine.config import load_recipe
from echofm.engine.downstream.backbone import load_backbone, pooled_dim
from echofm.engine.downstream.data import list_samples
from echofm.engine.downstream.finetune import finetune
from echofm.engine.downstream.heads import VideoHead
from echofm.engine.downstream.tasks import make_task

SMALL = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_num_heads=2", "model.decoder_depth=1"]


def test_finetune_starts_from_the_given_head(tiny_shards, tmp_path):
    r = load_recipe("recipes/downstream/synthetic_view.yaml", [
        f"data.shards={tiny_shards}", "downstream.backbone=random", f"downstream.out_dir={tmp_path}",
        "downstream.mode=finetune", "downstream.epochs=1", "downstream.lr=0.0", "downstream.backbone_lr=0.0",
        "data.batch_size=2", "train.checkpoint_every=0", "logging.progress=false", "logging.tensorboard=false",
        *SMALL])
    model, _ = load_backbone("random", r, seed=0)
    task = make_task(r.downstream, list_samples(tiny_shards, "train"))
    torch.manual_seed(123)
    head = VideoHead(pooled_dim(model, r.downstream.features), task.out_dim)
    start = {k: v.clone() for k, v in head.state_dict().items()}
    net, fit = finetune(task, model, r, run_dir=tmp_path / "ft", head=head, log=lambda *_: None)
    assert fit["steps"] >= 1
    # lr 0: the trained net's head is exactly the head passed in (not a fresh seeded one)
    for k, v in net.head.state_dict().items():
        assert torch.equal(v, start[k]), k
