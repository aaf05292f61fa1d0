"""Benchmark pretraining throughput: a fetalssl method's Lightning training step vs a minimal hand-written PyTorch
loop (same backbone, projector, loss, optimiser, batch and precision), and the real frame-pair loader vs
pre-made in-memory batches. Each mode runs in its own subprocess so its peak RSS (VmHWM) is its own.

    .venv/bin/python scripts/bench/training.py experiment=pocus paths.output_root=/tmp/bench \\
        'method.projector.hidden_dims=[1024,1024]' method.projector.out_dim=1024 --steps 12 --warmup 3
    # GPU (see gpu.py): trainer=gpu backbone=resnet50 data.image_size=224 channels_last=true

Modes: handwritten (plain loop on in-memory batches), lightning_memory (Trainer.fit of the method on the same
in-memory batches), lightning_loader (Trainer.fit with the configured VideoFramePairDataModule). Printed:
pairs/s and images/s (2 views per pair) over the steps after `--warmup` (a step is timed from the end of the
previous one, so waiting for data counts), peak RSS, and the two ratios. With `--repeats R` every mode runs R
times, interleaved, and the ratios are taken per repeat (adjacent runs) and summarised by their median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from peak_memory import peak_rss_mib  # scripts/bench/, on sys.path when run as a script
from torch.utils.data import DataLoader

from fetalssl.models.optim import parameter_groups, scaled_lr, warmup_cosine

MODES = ("handwritten", "lightning_memory", "lightning_loader")


class StepTimer(L.Callback):
    """Timestamps at the end of every training step (data fetch, step and Lightning's hooks in between)."""

    def __init__(self, device: str):
        self.device, self.ends = device, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def memory_batches(cfg, n: int) -> list[dict[str, torch.Tensor]]:
    shape = (cfg.data.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    generator = torch.Generator().manual_seed(0)
    return [{"view1": torch.randn(shape, generator=generator), "view2": torch.randn(shape, generator=generator)}
            for _ in range(n)]


def build_method(cfg):
    """As fetalssl-train builds it (fetalssl.cli.train): channels_last and torch.compile of the backbone."""
    backbone = instantiate(cfg.backbone)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    method = instantiate(cfg.method, backbone=backbone)
    if cfg.compile:
        method.backbone.compile()
    return method


def run_handwritten(cfg, steps: int) -> list[float]:
    """The whole training step written out: forward both views, loss, backward, optimiser + LR schedule."""
    device = "cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu"
    method = build_method(cfg).to(device).train()
    lr = scaled_lr(cfg.method.base_lr, cfg.data.batch_size, 1, 1)
    optimizer = method.optimizer_factory(parameter_groups([method]), lr=lr)
    # The method's schedule (configure_optimizers): warm-up over method.warmup_epochs epochs, where the
    # in-memory "epoch" of lightning_memory is `steps` batches; both modes then make the same updates.
    lr_warmup = round(cfg.method.warmup_epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, lr_warmup, steps))
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if cfg.trainer.precision == "bf16-mixed"
                else contextlib.nullcontext())
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    ends = []
    for step, batch in enumerate(memory_batches(cfg, steps)):
        batch = {k: v.to(device, memory_format=memory_format, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = method.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        method.after_optimizer_step(step)
        if device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    return ends


def run_lightning(cfg, steps: int, real_loader: bool) -> list[float]:
    method = build_method(cfg)
    timer = StepTimer("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    trainer = instantiate(cfg.trainer, max_epochs=None, max_steps=steps, logger=False, callbacks=[timer],
                          enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False)
    if real_loader:
        datamodule = instantiate(cfg.data, pair_sampler=instantiate(cfg.pairs), views=instantiate(cfg.augment))
        trainer.fit(method, datamodule=datamodule)
    else:
        trainer.fit(method, train_dataloaders=DataLoader(memory_batches(cfg, steps), batch_size=None))
    if trainer.global_step != steps:
        raise RuntimeError(f"ran {trainer.global_step} steps, not {steps}: give the loader more samples per epoch")
    return timer.ends


def measure(mode: str, overrides: list[str], steps: int, warmup: int) -> dict:
    with initialize_config_module("fetalssl.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "paths.output_dir=/tmp/fetalssl_bench_unused"])
    L.seed_everything(0)
    cuda = cfg.trainer.accelerator in ("gpu", "cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if mode == "handwritten":
        ends = run_handwritten(cfg, steps)
    else:
        ends = run_lightning(cfg, steps, real_loader=mode == "lightning_loader")
    # Steps after `warmup`, each from the end of the previous step to its own end (so data waits count).
    durations = np.diff(ends[warmup - 1:])
    batch = cfg.data.batch_size
    return {"mode": mode, "pairs_per_s": batch / durations.mean(), "images_per_s": 2 * batch / durations.mean(),
            "median_pairs_per_s": batch / float(np.median(durations)),
            "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "compile": bool(cfg.compile), "method": cfg.method._target_, "workers": cfg.data.num_workers,
            "batch_size": cfg.data.batch_size, "image_size": cfg.data.image_size, "backbone": cfg.backbone.name,
            "precision": cfg.trainer.precision, "threads": torch.get_num_threads()}


def run_child(mode: str, args) -> dict:
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args.overrides, "--one", mode,
                            "--steps", str(args.steps), "--warmup", str(args.warmup)], capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def summarise_ratio(name: str, ratios: list[float], target: str) -> None:
    print(f"{name}: median {np.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, "
          f"{len(ratios)} paired repeats: {' '.join(f'{r:.3f}' for r in ratios)}) {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every mode this often, interleaved (order reversed every other repeat, so a "
                             "slow drift of the machine hits all modes alike); ratios are paired per repeat")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # child process: one mode, JSON out
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be in [1, --steps): the first step is timed from the end of step `warmup`")
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        print(json.dumps(measure(args.one, args.overrides, args.steps, args.warmup)))
        return
    runs: list[dict[str, dict]] = []
    for repeat in range(args.repeats):
        results = {}
        for mode in (args.modes if repeat % 2 == 0 else args.modes[::-1]):
            results[mode] = r = run_child(mode, args)
            print(f"repeat {repeat} {mode:<18} {r['pairs_per_s']:8.2f} pairs/s (median step: "
                  f"{r['median_pairs_per_s']:8.2f}) {r['images_per_s']:8.2f} images/s  "
                  f"peak RSS {r['peak_rss_mib']:7.0f} MiB", flush=True)
        runs.append(results)
    first = next(iter(runs[0].values()))
    print(f"({first['backbone']}, {first['image_size']} px, batch {first['batch_size']}, {first['precision']}, "
          f"{first['threads']} torch threads, {args.steps - args.warmup} timed steps after {args.warmup})")
    for mode in args.modes:
        rates = [run[mode]["pairs_per_s"] for run in runs]
        print(f"{mode:<18} median over repeats {np.median(rates):8.2f} pairs/s "
              f"(min {min(rates):.2f}, max {max(rates):.2f})")
    if {"handwritten", "lightning_memory"} <= set(args.modes):
        summarise_ratio("training step: fetalssl/Lightning / hand-written loop",
                        [run["lightning_memory"]["pairs_per_s"] / run["handwritten"]["pairs_per_s"] for run in runs],
                        "(target >= 0.95)")
    if {"lightning_memory", "lightning_loader"} <= set(args.modes):
        summarise_ratio("loader vs model: real loader / in-memory batches",
                        [run["lightning_loader"]["pairs_per_s"] / run["lightning_memory"]["pairs_per_s"]
                         for run in runs], "(target >= 0.90)")


if __name__ == "__main__":
    main()
