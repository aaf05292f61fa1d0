"""The console: quiet by default (known harmless warnings and Lightning's chatter off), everything back with
verbose; progress as log lines where there is no terminal; sweeps say which point of how many."""

import logging
import os
import time
import warnings
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli
from fetalssl import progress as progress_module
from fetalssl.progress import ConsoleProgress, configure_console, eta, format_duration, progress


@pytest.fixture
def restore_logging():
    levels = {name: logging.getLogger(name).level for name in ("lightning.pytorch", "lightning.fabric", "lightning",
                                                               "fetalssl")}
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_quiet_silences_the_known_warnings_and_lightnings_info_and_verbose_does_not(restore_logging):
    configure_console(verbose=False)
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.WARNING
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use something else", UserWarning, stacklevel=2)
        warnings.warn("The number of training batches (1) is smaller than the logging interval", UserWarning, stacklevel=2)
        warnings.warn("a new, unknown warning", UserWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["a new, unknown warning"]  # only the known ones are dropped
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.NOTSET)  # a fresh process: nothing set yet
    configure_console(verbose=True)
    assert logging.getLogger("lightning.pytorch").level == logging.NOTSET  # left to Lightning: its info shows
    assert logging.getLogger("fetalssl").getEffectiveLevel() == logging.DEBUG


def test_durations_and_eta_read_as_clock_times():
    assert format_duration(59.6) == "1:00" and format_duration(3725) == "1:02:05"
    assert eta(60.0, 1, 4) == "3:00" and eta(10.0, 0, 4) == "?"


def test_progress_without_a_terminal_logs_done_of_total_with_rate_and_eta(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "is_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="fetalssl.progress"):
        assert list(progress(range(5), 5, "frame cache", log_every_seconds=0)) == list(range(5))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and lines[-1].startswith("frame cache: 5/5, ") and "ETA 0:00" in lines[-1]


def test_training_progress_without_a_terminal_logs_step_of_total_loss_and_eta(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "is_terminal", lambda: False)
    bar = ConsoleProgress(log_every_seconds=0)
    trainer = SimpleNamespace(global_step=0, current_epoch=0, estimated_stepping_batches=10,
                              callback_metrics={"train/loss": torch.tensor(1.25)})
    with caplog.at_level(logging.INFO, logger="fetalssl.progress"):
        bar._start = bar._last = 0.0
        bar._first_step = 0
        trainer.global_step = 4
        bar._log_line(trainer, "training")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("training: epoch 0, step 4/10, loss 1.2500, ") and "ETA" in line


@pytest.mark.slow  # two fine-tuning runs through the CLI
def test_a_run_is_quiet_by_default_ends_with_its_folder_and_says_everything_with_verbose(tiny_demo_data, tmp_path):
    args = [f"data.root={tiny_demo_data}", f"paths.output_root={tmp_path}", "data.image_size=32",
            "trainer.max_epochs=1", "finetune_mode=linear", "data.fraction=0.5"]
    quiet = run_cli("fetalssl-finetune", *args, "run_id=quiet")
    loud = run_cli("fetalssl-finetune", *args, "run_id=loud", "verbose=true")
    quiet_text, loud_text = quiet.stdout + quiet.stderr, loud.stdout + loud.stderr
    for chatter in ("GPU available", "LitLogger", "LeafSpec", "Total params"):
        assert chatter not in quiet_text and chatter in loud_text, chatter
    assert "run folder" in quiet.stdout.strip().splitlines()[-1] and quiet.stderr.strip() == ""
    assert len(quiet_text.strip().splitlines()) <= 10 < len(loud_text.strip().splitlines())


def test_training_lines_are_due_every_log_every_seconds_and_only_on_rank_zero(monkeypatch):
    monkeypatch.setattr(progress_module, "is_terminal", lambda: False)
    bar = ConsoleProgress(log_every_seconds=30)
    rank0, rank1 = SimpleNamespace(is_global_zero=True), SimpleNamespace(is_global_zero=False)
    bar._last = progress_module.time.monotonic()
    assert not bar._due(rank0)  # a line was just printed
    bar._last -= 31
    assert bar._due(rank0) and not bar._due(rank1)


def test_a_sweep_point_logs_its_number_of_all_points_and_an_eta(tmp_path, caplog):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from fetalssl.cli.sweep import log_sweep_point

    (tmp_path / "multirun.yaml").write_text("hydra:\n  sweeper:\n    params:\n      seed: 0,1,2\n"
                                            "  overrides:\n    task: ['data_fraction=pct1,pct10']\n")
    launched = time.time() - 60  # the sweep started a minute ago (multirun.yaml is written at launch)
    os.utime(tmp_path / "multirun.yaml", (launched, launched))
    cfg = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path)},
                                      "job": {"num": 2}}})
    HydraConfig.instance().cfg = cfg
    try:
        with caplog.at_level(logging.INFO, logger="fetalssl.cli.sweep"):
            log_sweep_point()
    finally:
        HydraConfig.instance().cfg = None
    (line,) = [r.getMessage() for r in caplog.records]
    # 3 seeds x 2 fractions; 2 points took a minute, so the 4 left take two
    assert line.startswith("sweep point 3 of 6, 1:00 elapsed") and line.endswith("ETA 2:00")
