"""Multi-process scale-out checks, run as subprocesses of the CLI (Lightning re-launches sys.argv per rank)."""

import csv
import os
from pathlib import Path

import pytest
import torch

from conftest import run_cli

pytestmark = pytest.mark.slow

# Tiny heads/images; GroupNorm backbone and BN-free projector so 2 ranks x B equals 1 x 2B exactly (SyncBatchNorm
# would do it for BatchNorm, but PyTorch supports it on GPUs only).
TINY = ["data.image_size=32", "data.short_side=40", "data.samples_per_video=16", "data.num_workers=0",
        "+backbone.norm_layer=groupnorm", "method.projector.hidden_dims=[32]", "method.projector.out_dim=16",
        "method.projector.hidden_bn=false", "probe=none", "trainer.log_every_n_steps=1"]
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-6


def _train(data: Path, out: Path, run_id: str, *args: str, check: bool = True):
    env_path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = env_path  # KillAtStep lives in tests/
    tiny = [a for a in TINY if not a.startswith("method.projector")] if "method=dino" in args else TINY  # a head
    return run_cli("fetalssl-train", *tiny, f"data.root={data}", f"data.cache_dir={out / 'cache'}",
                   f"paths.output_root={out}", f"run_id={run_id}", *args, check=check)


def _metrics(run_dir: Path, key: str) -> dict[int, float]:
    """step -> value; a step re-done after a resume is logged twice: the later row wins."""
    rows = csv.DictReader((run_dir / "logs" / "metrics.csv").open())
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


# BN-free heads for the methods with a predictor (their papers put BN in both heads).
BN_FREE_PREDICTOR = ["method.projector.last_bn=false", "method.predictor.hidden_dims=[32]",
                     "method.predictor.out_dim=16", "method.predictor.hidden_bn=false"]
QUEUES = {"moco": "queue.rows", "nnclr": "support.rows"}  # filled with the global batch, rank by rank


@pytest.mark.parametrize("method", ["barlowtwins", "simclr", "moco", "simsiam", "mocov3", "nnclr"])
def test_two_ranks_of_batch_b_take_the_step_of_one_process_with_batch_2b(method, tiny_demo_data, tmp_path):
    step = ["trainer.max_steps=1", "trainer.limit_val_batches=0", "data.val_fraction=0",
            "callbacks.last_checkpoint.every_n_train_steps=1", f"method={method}",
            *(BN_FREE_PREDICTOR if method in ("simsiam", "mocov3", "nnclr") else [])]
    _train(tiny_demo_data, tmp_path, "one", *step, "trainer=cpu", "data.batch_size=8")
    _train(tiny_demo_data, tmp_path, "ddp", *step, "trainer=ddp_sim", "data.batch_size=4")
    runs = {r: tmp_path / "pretrain" / method / r for r in ("one", "ddp")}
    one, ddp = (torch.load(runs[r] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for r in runs)
    assert _metrics(runs["ddp"], "train/loss")[0] == pytest.approx(_metrics(runs["one"], "train/loss")[0],
                                                                   rel=LOSS_RTOL)
    if method in QUEUES:
        # The queue holds the same 8 rows, enqueued rank by rank: rank r has samples r, r+2, ... of the batch.
        key = QUEUES[method]
        order = [i for r in range(2) for i in range(r, 8, 2)]
        torch.testing.assert_close(ddp[key][:8], one[key][order], atol=PARAM_ATOL, rtol=0)
        torch.testing.assert_close(ddp[key][8:], one[key][8:], atol=0, rtol=0)  # initial rows untouched
        one.pop(key), ddp.pop(key)
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], atol=PARAM_ATOL, rtol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["barlowtwins", "byol", "dino"])
def test_a_run_killed_mid_epoch_and_resumed_ends_like_an_uninterrupted_one(method, tiny_demo_data, tmp_path):
    # 32 train pairs / batch 4 = 8 steps per epoch, 2 epochs; last.ckpt every 3 steps; killed after step 11
    # (epoch 1, batch 3): resumes from step 9, mid-epoch, with one data worker (lazy iteration + set_epoch).
    run = ["trainer.max_epochs=2", "data.batch_size=4", "data.num_workers=1", "data.val_fraction=0.5",
           "data.samples_per_video=32",  # 1 train video (the other patient is val) x 32 pairs
           "callbacks.last_checkpoint.every_n_train_steps=3", "trainer.deterministic=true", f"method={method}"]
    if method == "byol":
        run += ["method.predictor.hidden_dims=[32]", "method.predictor.out_dim=16", "method.predictor.hidden_bn=false"]
    if method == "dino":  # the centre, the teacher and the multi-crop views resume too
        run += ["augment=multicrop", "augment.n_local=2", "method.head.hidden_dims=[32]",
                "method.head.bottleneck_dim=8", "method.head.out_dim=64", "method.freeze_last_layer_epochs=1"]
    _train(tiny_demo_data, tmp_path, "straight", *run)
    killed = _train(tiny_demo_data, tmp_path, "resumed", *run, "+callbacks.kill._target_=_kill_at_step.KillAtStep",
                    "+callbacks.kill.step=11", check=False)
    assert killed.returncode == 17
    _train(tiny_demo_data, tmp_path, "resumed", *run)  # same run dir: resumes automatically
    dirs = {r: tmp_path / "pretrain" / method / r for r in ("straight", "resumed")}
    a, b = (torch.load(dirs[r] / "checkpoints" / "last.ckpt", weights_only=False) for r in dirs)
    assert a["global_step"] == b["global_step"] == 16
    for name in a["state_dict"]:  # online weights, EMA target, BatchNorm statistics: bit-equal on CPU
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for key in ("train/loss", "val/loss"):
        assert _metrics(dirs["resumed"], key) == _metrics(dirs["straight"], key)


def test_a_ddp_multirun_writes_one_directory_per_sweep_point(tiny_demo_data, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("fetalssl-train", "-m", *TINY, "trainer=ddp_sim", "method=barlowtwins", "data.batch_size=4,8",
            "trainer.max_steps=1", "trainer.limit_val_batches=0", f"data.root={tiny_demo_data}",
            f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=b${data.batch_size}", f"paths.output_root={tmp_path}",
            cwd=tmp_path)
    points = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert points == ["b4", "b8"]
    for point in points:
        assert (sweep / point / "backbone.pt").is_file()
        assert (sweep / point / "train_ddp_process_1.log").is_file()  # rank 1 ran in this job's dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "sweep"]  # no stray run dirs


def test_a_dino_run_without_centring_and_momentum_is_flagged_as_collapsed_and_a_normal_one_is_not(tiny_demo_data,
                                                                                                  tmp_path):
    """The broken run is DINO with neither of the paper's two guards (no centring: centre momentum 1; no momentum
    teacher: tau 0), which collapses onto one prototype (section 5.3); the normal run is the same with its
    paper's values."""
    run = ["method=dino", "augment=multicrop", "augment.n_local=2", "method.head.hidden_dims=[32]",
           "method.head.bottleneck_dim=8", "method.head.out_dim=64", "trainer.max_epochs=2", "data.batch_size=8",
           "data.val_fraction=0.5", "method.warmup_epochs=0"]
    broken = ["method.center_momentum=1.0", "method.tau_base=0", "method.tau_final=0"]
    warned, marginal = {}, {}
    for name, extra in (("normal", []), ("broken", broken)):
        _train(tiny_demo_data, tmp_path, name, *run, *extra)
        run_dir = tmp_path / "pretrain" / "dino" / name
        warned[name] = "the teacher has collapsed" in (run_dir / "train.log").read_text()
        marginal[name] = list(_metrics(run_dir, "monitor/teacher_marginal_entropy").values())[-1]
    assert warned == {"normal": False, "broken": True}
    assert marginal["broken"] < 0.05 < marginal["normal"]
