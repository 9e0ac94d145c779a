"""The W&B and MLflow sinks against the real clients (dev extra), no network: W&B in offline
mode (the history read back from the run's .wandb file), MLflow on local sqlite stores
(metrics read back with its client), the environment a user sets honoured unless the
recipe sets the key, a resumed run continuing the same tracker run, and a client that
cannot start reported in one line."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from echofm.engine.errors import UserError
from echofm.engine.logging import LoggingConfig, MetricsLogger, MlflowConfig, WandbConfig

wandb = pytest.importorskip("wandb", reason="the dev extra installs wandb: pip install -e '.[dev]'")
mlflow = pytest.importorskip("mlflow", reason="the dev extra installs mlflow-skinny: pip install -e '.[dev]'")

CONFIG = {"name": "r", "model": {"depth": 4, "mean": [0.5, 0.5, 0.5]}}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "MLFLOW_TRACKING_URI",
                "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # not ~/.config/wandb
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


def _logger(run_dir: Path, *, start: int = 0, **cfg) -> MetricsLogger:
    return MetricsLogger(LoggingConfig(tensorboard=False, progress=False, **cfg), run_dir, total_steps=30,
                         start_step=start, enabled=True, desc="pretrain", config=CONFIG)


def _run_steps(run_dir: Path, steps, start: int = 0, **cfg) -> None:
    log = _logger(run_dir, start=start, **cfg)
    for s in steps:
        log.log(s, {"loss": 1.0 / s, "lr": 1e-3, "mfu": None, "nested": {"a": float(s)}})
    log.close()


# ---------------------------------------------------------------- W&B offline files


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (.wandb): a 7-byte file header
    (':W&B', magic 0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks (7-byte
    header: crc32c, length, type FULL/FIRST/MIDDLE/LAST; a block tail < 7 bytes is padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # padding at the end of a block
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def wandb_history(run_dir: Path, run_id: str, steps: int, wait_s: float = 30.0) -> tuple[dict[int, dict], dict]:
    """({step: {key: value}}, config) over every offline session of run `run_id` in run_dir,
    read again until `steps` history rows are there or `wait_s` passed: once in a loaded full
    suite a .wandb file read right after `run.finish()` lacked its history record (W&B's
    service process writes the log on its own; finish() does not wait for the disk)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            history, config = _wandb_history(run_dir, run_id)
        except Exception:  # a record still being written
            if time.monotonic() > deadline:
                raise
            history = {}
        if len(history) >= steps or time.monotonic() > deadline:
            return history, config
        time.sleep(0.2)


def _wandb_history(run_dir: Path, run_id: str) -> tuple[dict[int, dict], dict]:
    history, config = {}, {}
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, f"no offline W&B run {run_id} under {run_dir}/wandb"
    for f in files:
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                row = {("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in rec.history.item}
                history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
            elif kind in ("run", "config"):  # the run record carries the config given to init
                items = rec.run.config.update if kind == "run" else rec.config.update
                config.update({i.key: json.loads(i.value_json) for i in items})
    return history, config


def test_wandb_offline_from_the_environment_writes_the_history(tmp_path, monkeypatch):
    """WANDB_MODE=offline is honoured (the recipe leaves logging.wandb.mode null): no login,
    the steps' numbers in the offline run, a resumed run continues the same W&B run id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    _run_steps(tmp_path, [10, 20], wandb=WandbConfig(enabled=True))
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    _run_steps(tmp_path, [30], start=20, wandb=WandbConfig(enabled=True))
    assert json.loads((tmp_path / "trackers.json").read_text())["wandb"] == run_id
    history, config = wandb_history(tmp_path, run_id, steps=3)
    assert history == {10: {"loss": 0.1, "lr": 1e-3, "nested/a": 10.0},
                       20: {"loss": 0.05, "lr": 1e-3, "nested/a": 20.0},
                       30: {"loss": 1 / 30, "lr": 1e-3, "nested/a": 30.0}}
    assert {k: config[k] for k in CONFIG} == CONFIG  # the recipe is the run's config


def test_wandb_mode_set_in_the_recipe_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")  # online without a key would fail: the recipe says offline
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    _run_steps(tmp_path, [5], wandb=WandbConfig(enabled=True, mode="offline", project="from-recipe"))
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    assert wandb_history(tmp_path, run_id, steps=1)[0] == {5: {"loss": 0.2, "lr": 1e-3, "nested/a": 5.0}}
    (run,) = [r for f in (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
              for r in wandb_records(f) if r.WhichOneof("record_type") == "run"]
    assert run.run.project == "from-recipe"


# ---------------------------------------------------------------- MLflow local stores


def _mlflow_metrics(uri: str, experiment: str = "echofm") -> tuple[dict, dict]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    (run,) = client.search_runs([exp.experiment_id])
    hist = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}
    return hist, run.data.params


def test_mlflow_uri_from_the_environment_metrics_and_resume(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir = tmp_path / "run"
    _run_steps(run_dir, [10, 20], mlflow=MlflowConfig(enabled=True))
    _run_steps(run_dir, [30], start=20, mlflow=MlflowConfig(enabled=True))  # the same MLflow run
    hist, params = _mlflow_metrics(uri)
    assert hist == {"loss": [(10, 0.1), (20, 0.05), (30, 1 / 30)], "lr": [(10, 1e-3), (20, 1e-3), (30, 1e-3)],
                    "nested/a": [(10, 10.0), (20, 20.0), (30, 30.0)]}
    assert params == {"name": "r", "model/depth": "4", "model/mean": "[0.5, 0.5, 0.5]"}


def test_mlflow_uri_set_in_the_recipe_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    uri = f"sqlite:///{tmp_path / 'recipe.db'}"
    _run_steps(tmp_path / "run", [7], mlflow=MlflowConfig(enabled=True, tracking_uri=uri, experiment="exp"))
    assert _mlflow_metrics(uri, "exp")[0]["loss"] == [(7, 1 / 7)]
    assert not (tmp_path / "env.db").exists()


def test_mlflow_default_store_of_the_installed_client(tmp_path, monkeypatch):
    """Nothing set: the client's own default store (MLflow 3: sqlite:///mlflow.db in the
    current folder) takes the run."""
    monkeypatch.chdir(tmp_path)
    _run_steps(tmp_path / "run", [3], mlflow=MlflowConfig(enabled=True))
    assert _mlflow_metrics(mlflow.get_tracking_uri())[0]["loss"] == [(3, 1 / 3)]


def test_a_store_the_client_refuses_is_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        _logger(tmp_path, mlflow=MlflowConfig(enabled=True, tracking_uri="nosuchscheme://x"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("logging.mlflow: ") and "MLFLOW_TRACKING_URI" in msg
    assert not (tmp_path / "metrics.jsonl").exists()
