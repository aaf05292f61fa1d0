"""What a console script logs about the sweep it runs in: "sweep point k of N" with elapsed time and ETA."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from fetalssl.progress import eta, format_duration
from fetalssl.report.collect import expected_jobs_from_multirun

log = logging.getLogger(__name__)


def log_sweep_point() -> None:
    """In a multirun job: its number among the sweep's points, the time since the sweep started (its
    multirun.yaml, written at launch) and the ETA at the pace of the points so far. Nothing in a single run."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hydra_cfg = HydraConfig.get()
    multirun = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    try:
        total = len(expected_jobs_from_multirun(multirun))
        elapsed = time.time() - multirun.stat().st_mtime
    except (ValueError, OSError) as err:  # another sweeper, or no multirun.yaml: the count alone
        log.info("sweep point %d (%s)", hydra_cfg.job.num + 1, err)
        return
    done = hydra_cfg.job.num
    log.info("sweep point %d of %d, %s elapsed, ETA %s", done + 1, total, format_duration(elapsed),
             eta(elapsed, done, total))
