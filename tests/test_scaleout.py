"""Scale-out: resumable training loader, resume-point choice, Slurm launcher resources and SLURM rank reading.
The multi-process checks (DDP equivalence, kill-and-resume, DDP multirun) are in test_scaleout_slow.py."""

import os
import time

import pytest
import torch
from hydra import compose, initialize_config_module
from submitit.slurm.slurm import _make_sbatch_string
from torch.utils.data import Dataset

from fetalssl.data.pretrain import EpochSampler, InterleavedShard, ResumableDataLoader
from fetalssl.loggers import AppendingCSVLogger
from fetalssl.runtime import resolve_ckpt_path


class _Indices(Dataset):
    """Returns the (epoch, index) key the sampler handed out, as FramePairDataset draws from it."""

    def __init__(self, n: int):
        self.n, self.loaded = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        self.loaded.append(key[1])
        return key


def _loader(ds: _Indices) -> ResumableDataLoader:
    return ResumableDataLoader(dataset=ds, batch_size=4, sampler=EpochSampler(ds, True, seed=3), drop_last=True)


def test_resumed_loader_continues_the_epoch_where_it_stopped_without_loading_skipped_samples():
    ds = _Indices(30)
    full = _loader(ds)
    full.sampler.set_epoch(2)
    it = iter(full)
    head = [next(it) for _ in range(3)]
    state = full.progress()
    tail = list(it)
    assert state == {"epoch": 2, "batches": 3} and len(full) == 7 and len(head) + len(tail) == 7

    ds2 = _Indices(30)
    resumed = _loader(ds2)
    resumed.resume(state)
    it2 = iter(resumed)  # Lightning creates the iterator before set_epoch on resume: iteration must start lazily
    resumed.sampler.set_epoch(2)
    rest = list(it2)
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(rest, tail, strict=True))
    assert len(ds2.loaded) == 4 * len(tail)  # skipped batches were never loaded
    # the next epoch starts from its beginning
    resumed.sampler.set_epoch(3)
    assert len(list(resumed)) == 7


def test_two_shards_of_batch_b_hold_the_samples_of_one_batch_2b():
    one = list(_loader(_Indices(30)))  # batch 4
    two = _Indices(30)
    shards = [ResumableDataLoader(dataset=two, batch_size=2, drop_last=True,
                                  sampler=InterleavedShard(EpochSampler(two, True, seed=3), num_replicas=2, rank=r))
              for r in range(2)]
    for shard in shards:
        shard.sampler.set_epoch(0)
    steps = list(zip(*shards, strict=True))
    assert len(steps) == len(one) == 7
    for step, single in zip(steps, one, strict=True):
        assert sorted(torch.cat([b[1] for b in step]).tolist()) == sorted(single[1].tolist())


def test_resumed_run_appends_to_the_metrics_file(tmp_path):
    first = AppendingCSVLogger(tmp_path, name="logs", version="")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.log_metrics({"val/loss": 2.0}, step=1)
    first.save()
    resumed = AppendingCSVLogger(tmp_path, name="logs", version="")  # Lightning's CSVLogger would delete the file
    resumed.log_metrics({"train/loss": 3.0}, step=2)
    resumed.log_metrics({"lr": 0.1}, step=2)  # a new column: the file is rewritten with it
    resumed.save()
    rows = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    assert rows == ["lr,step,train/loss,val/loss", ",0,1.0,", ",1,,2.0", ",2,3.0,", "0.1,2,,"]


def test_resume_takes_the_newest_checkpoint_in_the_run_dir(tmp_path):
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("last", tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resolve_ckpt_path(None, tmp_path) == str(last)
    time.sleep(0.01)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # written by Lightning's SLURM signal handler after last.ckpt
    hpc.write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path) == str(hpc)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)


def _train_cfg(*overrides: str):
    with initialize_config_module("fetalssl.conf", version_base="1.3"):
        return compose("train", overrides=["data.root=/data", *overrides], return_hydra_config=True)


def test_slurm_launcher_asks_for_the_resources_of_the_trainer_config(tmp_path):
    import fetalssl.runtime  # noqa: F401  (registers the gpus_per_node resolver)

    cfg = _train_cfg("launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                     "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60")
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert _train_cfg("launcher=slurm", "trainer=ddp_sim").hydra.launcher.gpus_per_node == 0
    assert cfg.trainer.plugins[0].auto_requeue is False  # submitit requeues; Lightning must not too

    # The sbatch script submitit would write for these parameters (no cluster needed at this level).
    sbatch = _make_sbatch_string(
        command="python job.py", folder=tmp_path, nodes=launcher.nodes, ntasks_per_node=launcher.tasks_per_node,
        gpus_per_node=launcher.gpus_per_node, time=launcher.timeout_min, mem=f"{launcher.mem_gb}GB",
        cpus_per_task=launcher.cpus_per_task, partition=launcher.partition, signal_delay_s=launcher.signal_delay_s,
    )
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=60"):
        assert f"#SBATCH {line}" in sbatch


def test_simulated_slurm_task_gets_its_rank_from_slurm_variables(monkeypatch, tmp_path):
    from fetalssl.runtime import build_trainer

    env = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_JOB_NAME": "fetalssl", "SLURM_JOB_ID": "77", "SLURM_NODELIST": "n[1-2]"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = _train_cfg("trainer=ddp_sim", "trainer.num_nodes=2", "logger=none", "callbacks={}",
                     f"paths.output_dir={tmp_path}")
    trainer = build_trainer(cfg)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (3, 1, 1, 4)
    assert os.environ.get("LOCAL_RANK") is None  # nothing was launched
