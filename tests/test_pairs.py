"""Pair samplers: frame choice, gap limits in frames/seconds with stride, determinism, mixing."""

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fetalssl.data.pairs import (
    MixupPairs,
    PairSpec,
    SameFramePairs,
    TemporalPairs,
    compose_view,
    gap_in_cached_frames,
)

CONF = __import__("pathlib").Path(__file__).parents[1] / "src" / "fetalssl" / "conf" / "pairs"


def draw(sampler, n=2000, n_frames=50, fps=25.0, stride=1, seed=0) -> list[PairSpec]:
    rng = np.random.default_rng(seed)
    return [sampler(rng, n_frames, fps, stride) for _ in range(n)]


def test_same_frame_pairs_share_one_frame():
    pairs = draw(SameFramePairs(), n_frames=7)
    assert all(p.view1 == p.view2 and len(p.view1) == 1 and p.view1[0][1] == 1.0 for p in pairs)
    assert {p.view1[0][0] for p in pairs} == set(range(7))  # every frame reachable, none outside


@pytest.mark.parametrize(
    ("max_gap", "unit", "fps", "stride", "cached_gap"),
    [
        (3, "frames", 25.0, 1, 3),
        (10, "frames", 25.0, 3, 3),
        (0.4, "seconds", 25.0, 1, 10),
        (0.4, "seconds", 25.0, 5, 2),
    ],
)
def test_temporal_pairs_respect_max_gap(max_gap, unit, fps, stride, cached_gap):
    assert gap_in_cached_frames(max_gap, unit, fps, stride) == cached_gap
    pairs = draw(TemporalPairs(max_gap=max_gap, unit=unit), n_frames=40, fps=fps, stride=stride)
    gaps = np.array([p.view2[0][0] - p.view1[0][0] for p in pairs])
    assert np.abs(gaps).max() == cached_gap  # the bound is reached and never exceeded
    # in source units the gap stays within max_gap
    source_gap = np.abs(gaps) * stride / (fps if unit == "seconds" else 1)
    assert source_gap.max() <= max_gap + 1e-9
    assert all(0 <= i < 40 for p in pairs for i in p.frame_indices())


def test_temporal_gap_smaller_than_stride_degenerates_to_same_frame():
    pairs = draw(TemporalPairs(max_gap=2, unit="frames"), stride=5, n=200)
    assert all(p.view1 == p.view2 for p in pairs)


def test_seconds_need_fps():
    with pytest.raises(ValueError, match="fps"):
        draw(TemporalPairs(max_gap=1.0, unit="seconds"), fps=float("nan"), n=1)
    with pytest.raises(ValueError, match="unit"):
        TemporalPairs(max_gap=1, unit="minutes")


def test_samplers_are_deterministic_given_generator():
    for sampler in (SameFramePairs(), TemporalPairs(5, "frames"), MixupPairs(5, "frames", alpha=0.4)):
        assert draw(sampler, n=50, seed=3) == draw(sampler, n=50, seed=3)
        assert draw(sampler, n=50, seed=3) != draw(sampler, n=50, seed=4)


@pytest.mark.parametrize("alpha", [0.5, None])
def test_mixup_views_mix_anchor_with_neighbour(alpha):
    pairs = draw(MixupPairs(window=4, unit="frames", alpha=alpha), n_frames=30)
    weights = []
    for p in pairs:
        (a1, w1), (n1, v1) = p.view1
        (a2, w2), (n2, v2) = p.view2
        assert a1 == a2 and abs(n1 - a1) <= 4 and abs(n2 - a2) <= 4
        assert w1 + v1 == pytest.approx(1) and w2 + v2 == pytest.approx(1) and 0 <= w1 <= 1
        weights.append(w1)
    # Beta(0.5, 0.5) piles up near 0 and 1; uniform does not
    extreme = np.mean((np.array(weights) < 0.1) | (np.array(weights) > 0.9))
    assert extreme == pytest.approx(0.41 if alpha == 0.5 else 0.2, abs=0.05)


def test_compose_view_weights_frames():
    frames = {0: np.full((2, 2), 100, np.uint8), 3: np.full((2, 2), 200, np.uint8)}
    assert compose_view(frames, ((0, 1.0),)) is frames[0]
    mixed = compose_view(frames, ((0, 0.25), (3, 0.75)))
    assert mixed.dtype == np.uint8 and (mixed == 175).all()


@pytest.mark.parametrize("name", ["same_frame", "temporal", "mixup"])
def test_pair_configs_instantiate(name):
    sampler = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    pair = sampler(np.random.default_rng(0), 100, 30.0, 2)
    assert isinstance(pair, PairSpec) and all(0 <= i < 100 for i in pair.frame_indices())
