"""Fine-tuning over a pretraining sweep: the fine-tuning grid once for every run of a `fetalssl-train -m` sweep.

`fetalssl-finetune -m init.pretrain_sweep=<sweep dir> ...` becomes a sweep over `init.pretrain_run`, one value per
pretraining run found below the sweep dir (a folder holding backbone.pt), crossed with the rest of the grid.
Each fine-tuning run records what its pretraining run was given (`pretraining_record`): the overrides it was
launched with and the data it really used (pretraining_data.json), so the report can group and plot by them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fetalssl.data.pretrain import TRAINING_DATA_FILE
from fetalssl.finetune.init import BACKBONE_FILE, recorded_method

SWEEP_KEY = "init.pretrain_sweep"
RUN_KEY = "init.pretrain_run"
# Pretraining overrides that describe the data budget: pretraining_data.json's settings say what they resolved
# to (a budget preset sets several at once), so the grid shows the settings instead.
BUDGET_KEYS = ("data_budget", "data.patient_fraction", "data.frames_per_video", "data.frame_selection",
               "data.pairs_per_epoch")
BUDGET_SETTINGS = ("patient_fraction", "frames_per_video", "frame_selection", "pairs_per_epoch")


def pretraining_runs(sweep_dir: str | Path) -> list[str]:
    """Every pretraining run below `sweep_dir` (a folder with backbone.pt), as paths relative to it, sorted."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{SWEEP_KEY}={sweep_dir} is not a directory")
    runs = sorted(p.parent.relative_to(sweep_dir).as_posix() for p in sweep_dir.rglob(BACKBONE_FILE))
    if not runs:
        raise FileNotFoundError(f"{SWEEP_KEY}={sweep_dir}: no pretraining run (no {BACKBONE_FILE}) below it")
    return runs


def expand_pretrain_sweep(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with `init.pretrain_sweep=DIR` turned into a multirun over its pretraining runs
    (`init=ssl init.pretrain_run=<run>,<run>,...`); other arguments are returned unchanged."""
    argv = list(argv)
    given = [a for a in argv if a.startswith(SWEEP_KEY + "=")]
    if not given or any(a.startswith(RUN_KEY + "=") for a in argv):
        return argv
    sweep_dir = given[-1].partition("=")[2].strip("'\"")
    inits = [a.partition("=")[2] for a in argv if a.startswith("init=")]
    if any(value != "ssl" for value in inits):
        raise ValueError(f"{SWEEP_KEY} fine-tunes pretraining runs (init=ssl); got init={inits[-1]}: run other "
                         "inits in a sweep of their own, so they are not repeated for every pretraining run")
    runs = pretraining_runs(sweep_dir)
    return [*([] if {"-m", "--multirun"} & set(argv) else ["-m"]), *argv, *([] if inits else ["init=ssl"]),
            f"{RUN_KEY}={','.join(runs)}"]


def _overrides(run_dir: Path) -> dict[str, Any]:
    """`key: value` of the overrides a run was launched with, output locations left out (the run's own
    hydra.job.config.override_dirname.exclude_keys)."""
    hydra_dir = run_dir / ".hydra"
    if not (hydra_dir / "overrides.yaml").is_file():
        return {}
    hydra = (yaml.safe_load((hydra_dir / "hydra.yaml").read_text()) or {}).get("hydra", {}) \
        if (hydra_dir / "hydra.yaml").is_file() else {}
    excluded = set(((hydra.get("job") or {}).get("config") or {}).get("override_dirname", {}).get("exclude_keys") or [])
    overrides = {}
    for override in yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if key not in excluded:
            overrides[key] = yaml.safe_load(value) if value else None
    return overrides


def pretraining_record(run_dir: str | Path) -> dict[str, Any]:
    """What a pretraining run was given: its method, overrides and the data it used (pretraining_data.json)."""
    run_dir = Path(run_dir)
    data_file = run_dir / TRAINING_DATA_FILE
    data = json.loads(data_file.read_text()) if data_file.is_file() else {}
    settings = data.get("settings", {})
    return {"run": run_dir.name, "method": recorded_method(run_dir), "overrides": _overrides(run_dir),
            "data": {**{k: settings.get(k) for k in BUDGET_SETTINGS},
                     "patients": len(data.get("patients", [])), "videos": len(data.get("videos", [])),
                     "distinct_frames": sum(v["frames"] for v in data.get("videos", [])),
                     "pairs_per_epoch_used": data.get("pairs_per_epoch")}}


def grid_keys(record: dict[str, Any]) -> dict[str, Any]:
    """The record as `pretrain.<key>` grid keys: the budget settings and every other override but the method
    (which the grid has already)."""
    keys = {f"pretrain.{k}": record["data"][k] for k in BUDGET_SETTINGS}
    keys.update({f"pretrain.{k}": v for k, v in record["overrides"].items()
                 if k not in BUDGET_KEYS and k != "method"})
    return keys
