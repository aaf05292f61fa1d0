"""fetalssl-finetune: one fine-tuning run, or a sweep of them (-m) that survives failures and restarts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fetalssl.finetune.run import METRICS_FILE, config_key, run_finetune

log = logging.getLogger(__name__)


def already_done(output_dir: Path, key: str) -> bool:
    """A run counts as done when its metrics.json says ok for exactly this config."""
    try:
        previous = json.loads((output_dir / METRICS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return previous.get("status") == "ok" and previous.get("config_key") == key


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    output_dir = Path(cfg.paths.output_dir)
    if already_done(output_dir, config_key(cfg)):
        log.info("Skipping %s: completed with this config already", output_dir)
        return
    try:
        run_finetune(cfg, output_dir)
    except Exception:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        # One failed grid point must not stop the sweep: it is in metrics.json and fetalssl-report lists it.
        log.exception("Run %s failed; the sweep goes on", output_dir)


if __name__ == "__main__":
    main()
