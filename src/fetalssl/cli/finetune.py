"""fetalssl-finetune: one fine-tuning run, or a sweep of them (-m) that survives failures and restarts."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fetalssl.finetune.run import run_unless_finished

log = logging.getLogger(__name__)


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    output_dir = Path(cfg.paths.output_dir)
    try:
        run_unless_finished(cfg, output_dir)
    except Exception:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        # One failed grid point must not stop the sweep: it is in metrics.json and fetalssl-report lists it.
        log.exception("Run %s failed; the sweep goes on", output_dir)


if __name__ == "__main__":
    main()
