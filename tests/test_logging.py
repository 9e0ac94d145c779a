"""engine/logging.py: step lines without the progress bar, a tracker enabled but not
installed (the real clients: tests/test_trackers.py), and the reconstruction figure's
outline of the predicted patches."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from echofm.engine.errors import UserError
from echofm.engine.logging import (OUTLINE_RGB, LoggingConfig, MetricsLogger, MlflowConfig, WandbConfig,
                                   mark_predicted, reconstruction_rows, step_line)

METRICS = {"loss": 0.51234, "lr": 2.5e-4, "sampled_fps": 1234.4, "step_time_s": 0.4, "mfu": None,
           "nested": {"a": 1.0, "flag": True}, "mfu_peak": "none"}


def _logger(tmp_path, *, start=0, config=None, **cfg):
    return MetricsLogger(LoggingConfig(tensorboard=False, **cfg), tmp_path, total_steps=600, start_step=start,
                         enabled=True, desc="pretrain", config=config)


# ---------------------------------------------------------------- step lines


def test_step_line_text_and_eta():
    assert step_line("pretrain", 20, 600, METRICS) == \
        "[pretrain] step 20/600 loss 0.5123 lr 2.50e-04 1,234 fps 0.40 s/step eta 3m52s"
    assert step_line("finetune", 5, 5, {"loss": 1.0, "sampled_fps": None}) == "[finetune] step 5/5 loss 1.0000"


def test_progress_off_prints_every_logged_step_and_train_log_keeps_them(tmp_path, capsys):
    # Regression: with logging.progress=false no step was reported anywhere but metrics.jsonl.
    log = _logger(tmp_path, progress=False)
    log.message("[echofm] fresh run")
    log.log(10, METRICS)
    log.log(20, METRICS)
    log.close()
    out = capsys.readouterr().out.splitlines()
    assert out == ["[echofm] fresh run", step_line("pretrain", 10, 600, METRICS),
                   step_line("pretrain", 20, 600, METRICS)]
    assert (tmp_path / "train.log").read_text().splitlines() == out
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]


def test_progress_bar_on_keeps_stdout_clean_but_logs_the_lines(tmp_path, capsys):
    log = _logger(tmp_path, progress=True)
    log.log(10, METRICS)
    log.close()
    assert "step 10/600" not in capsys.readouterr().out
    assert (tmp_path / "train.log").read_text() == step_line("pretrain", 10, 600, METRICS) + "\n"


# ---------------------------------------------------------------- W&B / MLflow not installed


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_enabled_but_not_installed_is_one_clear_error(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    cfg = {name: (WandbConfig if name == "wandb" else MlflowConfig)(enabled=True)}
    with pytest.raises(UserError, match=rf"logging.{name}.enabled: true, but the {name} package is not "
                                        rf"installed; pip install 'echofm\[{name}\]'"):
        _logger(tmp_path, **cfg)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing opened before the check


# ---------------------------------------------------------------- reconstruction figure


def test_mark_predicted_outlines_removed_patches_only():
    frames = np.full((1, 8, 8, 1), 100, np.uint8)              # 2 x 2 patches of 4 x 4
    removed = np.zeros((1, 8, 8, 1), bool)
    removed[0, :4, 4:] = True                                  # the top-right patch was predicted
    out = mark_predicted(frames, removed, 4)
    assert out.shape == (1, 8, 8, 3)
    outlined = np.all(out[0] == OUTLINE_RGB, axis=-1)
    want = np.zeros((8, 8), bool)
    want[0:4, 4:8] = True
    want[1:3, 5:7] = False                                     # the patch's interior keeps its pixels
    assert np.array_equal(outlined, want)
    assert np.all(out[0][~want] == 100)


def test_reconstruction_row_outlines_exactly_the_masked_patches():
    from echofm.engine.model import EchoFM, ModelConfig

    torch.manual_seed(0)
    m = EchoFM(ModelConfig(preset="echofm_tiny", num_frames=4, img_size=32, patch_size=8, tubelet=2, embed_dim=64,
                           depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                           pred_t_dim=4))
    video = torch.randint(0, 256, (1, 4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = m(video, generator=torch.Generator().manual_seed(0))
    rows = reconstruction_rows(m, video, out)
    rec = rows["reconstruction\n(outlined: predicted)"]
    corners = np.all(rec[:, ::8, ::8] == OUTLINE_RGB, axis=-1)  # [T, 4, 4]: each patch's top-left pixel
    grid = out["mask"][0].reshape(2, 4, 4).bool().numpy()        # [T', h, w], tubelet 2
    assert np.array_equal(corners, np.repeat(grid, 2, axis=0))
    assert 0 < corners.sum() < corners.size
