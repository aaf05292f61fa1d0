"""MoCo v2: every key of every micro-batch reaches the queue, and Shuffle-BN regroups the keys' BatchNorm."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fetalssl.models.queue import enqueue_
from fetalssl.models.shuffle_bn import shuffle_bn_forward
from test_methods import RandomPairs, build, trainer


def test_enqueue_wraps_around_and_keeps_the_newest_rows():
    queue, ptr = torch.zeros(5, 2), torch.tensor(3)
    enqueue_(queue, ptr, torch.arange(8.0).repeat(2, 1).T)  # 8 rows into 5 slots: the last 5 survive
    assert ptr.item() == (3 + 5) % 5
    assert queue[:, 0].tolist() == [5.0, 6.0, 7.0, 3.0, 4.0]


def test_every_key_of_every_micro_batch_is_enqueued_under_gradient_accumulation(tmp_path):
    torch.manual_seed(0)
    model = build("moco", warmup_epochs=0, shuffle_bn=False, queue_size=32)
    start_queue = model.queue.rows.clone()
    key_encoder = copy.deepcopy(model).train()  # keys are drawn before the first optimiser step moves the EMA
    data = DataLoader(RandomPairs(n=16), batch_size=4)
    t = trainer(tmp_path, max_steps=2)
    t.accumulate_grad_batches = 2
    t.fit(model, data)
    assert t.global_step == 2 and model.queue.ptr.item() == 16  # 2 steps x 2 micro-batches x 4 keys
    batches = list(data)
    with torch.no_grad():
        first_step = torch.cat([key_encoder.keys(b["view2"]) for b in batches[:2]])
    torch.testing.assert_close(model.queue.rows[:8], first_step, rtol=0, atol=1e-6)
    assert not torch.equal(model.queue.rows[8:16], start_queue[8:16])  # the second step's 8 keys arrived too
    assert torch.equal(model.queue.rows[16:], start_queue[16:])


def test_shuffle_bn_gives_each_group_its_own_statistics_and_restores_the_order():
    torch.manual_seed(0)
    x = torch.randn(8, 3) * 4 + 2
    per_sample = nn.Linear(3, 3)
    torch.testing.assert_close(shuffle_bn_forward(per_sample, x, groups=4), per_sample(x))  # order restored

    bn = nn.BatchNorm1d(3, affine=False).train()
    torch.manual_seed(1)
    out = shuffle_bn_forward(bn, x, groups=2)
    torch.manual_seed(1)
    perm = torch.randperm(8)  # the permutation shuffle_bn_forward drew
    for group in perm.view(2, 4):
        torch.testing.assert_close(out[group], F.batch_norm(x[group], None, None, training=True))
    assert not torch.allclose(out, F.batch_norm(x, None, None, training=True), atol=1e-3)
    with pytest.raises(ValueError, match="shuffle_bn_groups=3"):
        shuffle_bn_forward(bn, x, groups=3)


def test_moco_keys_use_shuffle_bn_in_training_only():
    torch.manual_seed(0)
    model = build("moco", shuffle_bn=True, shuffle_bn_groups=2).train()
    x = RandomPairs(n=8).v2
    plain = F.normalize(model.key_encoder(x), dim=1)
    assert not torch.allclose(model.keys(x), plain, atol=1e-4)
    model.shuffle_bn = False
    torch.testing.assert_close(model.keys(x), plain)
    model.shuffle_bn = True
    model.eval()
    torch.testing.assert_close(model.keys(x), F.normalize(model.key_encoder(x), dim=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Recorder(nn.Module):
    """Per-sample identity that remembers the batches it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x * 1.0


def _ddp_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)  # rank 0's permutation is broadcast, whatever the other ranks draw
    x = torch.arange(8.0).view(8, 1) + 100 * rank
    encoder = _Recorder()
    out = shuffle_bn_forward(encoder, x, groups=2)  # one group per rank: the paper's setting
    results[rank] = (out, torch.cat(encoder.seen), len(encoder.seen))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes over gloo: half a minute on 2 cores
def test_shuffle_bn_across_two_ranks_mixes_the_ranks_samples_and_restores_each_ranks_own():
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(_free_port(), results), nprocs=2, join=True)
    seen = {}
    for rank in (0, 1):
        out, encoded, calls = results[rank]
        assert torch.equal(out, torch.arange(8.0).view(8, 1) + 100 * rank)  # own samples, original order
        assert calls == 1  # one BN group per rank
        seen[rank] = set(encoded.flatten().tolist())
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 16  # a permutation of the global batch
    assert any(v >= 100 for v in seen[0]) and any(v < 100 for v in seen[1])  # each rank encodes the other's
