"""logger=csv|tensorboard|wandb|mlflow and several at once: each tracker's own files are read back, and hold the
run's metrics, its composed config and its grid keys."""

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B offline run file: a 7-byte header, then LevelDB log blocks of 32 KiB whose records are
    split into FULL (1), FIRST (2), MIDDLE (3) and LAST (4) chunks behind a 7-byte header (crc, length, type)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer: padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def wandb_run(run_dir: Path) -> tuple[list[dict], dict]:
    """History rows and config of the one offline W&B run below run_dir."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")

    def key(item):  # "train/loss" arrives as the nested key ["train", "loss"]
        return item.key or "/".join(item.nested_key)

    history, config = [], {}
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            config.update({key(item): json.loads(item.value_json) for item in record.config.update})
    return history, config


def csv_losses(run_dir: Path) -> list[float]:
    return [float(r["train/loss"]) for r in csv.DictReader((run_dir / "logs" / "metrics.csv").open()) if r.get("train/loss")]


@pytest.mark.slow  # one pretraining with four trackers and one fine-tuning: about 2 minutes
def test_every_tracker_holds_the_runs_losses_config_and_grid_keys(tiny_demo_data, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli("fetalssl-train", "method=simclr", "logger=[csv,tensorboard,wandb,mlflow]", f"data.root={tiny_demo_data}",
            f"paths.output_root={tmp_path}", "run_id=t", "data.image_size=32", "data.short_side=40",
            "data.samples_per_video=8", "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=3",
            "trainer.log_every_n_steps=1", "method.projector.hidden_dims=[32]", "method.projector.out_dim=16",
            "method.criterion.temperature=0.3", "probe=none")
    run = tmp_path / "pretrain" / "simclr" / "t"
    losses = csv_losses(run)
    assert len(losses) == 3

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    hparams = OmegaConf.load(run / "tensorboard" / "hparams.yaml")
    assert hparams.config.method.criterion.temperature == 0.3 and hparams.grid["method.criterion.temperature"] == "0.3"

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("fetalssl").experiment_id])
    history = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses, rel=1e-6)
    assert mlflow_run.data.params["grid/method"] == "simclr"
    assert mlflow_run.data.params["config/method/criterion/temperature"] == "0.3"

    history, config = wandb_run(run)
    assert [row["train/loss"] for row in history if "train/loss" in row] == pytest.approx(losses, rel=1e-6)
    assert config["grid"]["method"] == "simclr" and config["config"]["method"]["criterion"]["temperature"] == 0.3

    # Fine-tuning logs its grid point (the keys the report groups by) to the tracker as well.
    run_cli("fetalssl-finetune", "logger=[csv,tensorboard]", f"data.root={tiny_demo_data}", f"paths.output_root={tmp_path}",
            "run_id=f", "data.image_size=32", "trainer.max_epochs=1", "finetune_mode=linear", "data.fraction=0.5",
            "init=ssl", f"init.checkpoint={run / 'backbone.pt'}")
    (finetune_run,) = (tmp_path / "finetune").glob("*/f")
    grid = OmegaConf.load(finetune_run / "tensorboard" / "hparams.yaml").grid
    metrics = json.loads((finetune_run / "metrics.json").read_text())
    assert dict(grid) == metrics["grid"] and grid.fraction == 0.5
