"""fetalssl-predict: standard planes located in whole scan videos (per-frame CSV, best frames, timeline).

    fetalssl-predict model=<fine-tune run dir | .ts | .onnx> input=<video | DICOM | folder> [out_dir=...]

Hydra (key=value overrides, defaults in conf/predict.yaml) like the other run-producing commands.
Exit status: 0 every input processed, 1 some input failed (the others are still written), 2 bad model/input.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fetalssl.predict.predictor import load_predictor
from fetalssl.predict.scan import SUMMARY_FILE, FinderSettings, run_finder
from fetalssl.progress import configure_console

log = logging.getLogger(__name__)


def predict(cfg: DictConfig) -> int:
    configure_console(cfg.verbose)
    settings = FinderSettings(batch_size=cfg.batch_size, smooth_window=cfg.smooth_window,
                              abstain_threshold=cfg.abstain_threshold, found_threshold=cfg.found_threshold,
                              truth_suffix=cfg.truth_suffix, progress_every_seconds=cfg.progress_every_seconds)
    try:
        predictor = load_predictor(cfg.model, cfg.device)
        results = run_finder(Path(cfg.input), Path(cfg.out_dir), predictor, settings)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    failed = [r for r in results if r["status"] != "ok"]
    log.info("%d of %d inputs done -> %s (%s)", len(results) - len(failed), len(results), cfg.out_dir,
             SUMMARY_FILE)
    for r in failed:
        log.error("FAILED %s: %s", r["input"], r["error"])
    return 1 if failed else 0


def main() -> None:
    status: list[int] = []

    # hydra.main discards the task's return value, so the exit status is carried out in a closure.
    @hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
    def task(cfg: DictConfig) -> None:
        status.append(predict(cfg))

    task()
    sys.exit(status[0] if status else 2)


if __name__ == "__main__":
    main()
