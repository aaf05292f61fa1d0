"""fetalssl-finetune: one fine-tuning run, or a sweep of them (-m) that survives failures and restarts."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fetalssl.cli.sweep import log_sweep_point
from fetalssl.finetune.pretrain_sweep import expand_pretrain_sweep
from fetalssl.finetune.run import run_unless_finished
from fetalssl.progress import configure_console

log = logging.getLogger(__name__)


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
def run(cfg: DictConfig) -> None:
    configure_console(cfg.verbose)
    log_sweep_point()
    output_dir = Path(cfg.paths.output_dir)
    try:
        run_unless_finished(cfg, output_dir)
        log.info("run folder %s", output_dir)
    except Exception:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        # One failed grid point must not stop the sweep: it is in metrics.json and fetalssl-report lists it.
        log.exception("Run %s failed; the sweep goes on", output_dir)


def main() -> None:
    """The console script: `init.pretrain_sweep=DIR` becomes a sweep over DIR's pretraining runs, then Hydra."""
    try:
        sys.argv[1:] = expand_pretrain_sweep(sys.argv[1:])
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"fetalssl-finetune: error: {err}")
    run()


if __name__ == "__main__":
    main()
