"""Pretraining data budgets: a seeded, nested share of the patients, a frame cap per video, a pair budget."""

import json

import numpy as np
import pytest

from fetalssl.data.pretrain import TRAINING_DATA_FILE
from test_pretrain_data import LAYOUT, make_dm, video_root  # noqa: F401  (video_root is a fixture)


def train_patients(dm) -> set[str]:
    return {v.patient_id for v in dm.train_set.videos}


def test_patient_shares_are_seeded_nested_and_never_touch_validation(video_root, tmp_path):  # noqa: F811
    full = make_dm(video_root, tmp_path, val_fraction=0.2)
    val = {v.patient_id for v in full.val_set.videos}
    shares = {f: train_patients(make_dm(video_root, tmp_path, val_fraction=0.2, patient_fraction=f))
              for f in (0.25, 0.5, 0.75, 1.0)}
    assert [len(p) for p in shares.values()] == [1, 2, 3, 4]  # of the 4 training patients, >= 1
    assert shares[0.25] <= shares[0.5] <= shares[0.75] <= shares[1.0] == train_patients(full)
    for f in shares:  # validation is the same whatever the share, and never trained on
        dm = make_dm(video_root, tmp_path, val_fraction=0.2, patient_fraction=f)
        assert {v.patient_id for v in dm.val_set.videos} == val and not train_patients(dm) & val
    assert train_patients(make_dm(video_root, tmp_path, val_fraction=0.2, patient_fraction=0.5)) == shares[0.5]
    others = [train_patients(make_dm(video_root, tmp_path, val_fraction=0.2, patient_fraction=0.5, seed=s))
              for s in range(1, 6)]
    assert any(o != shares[0.5] for o in others)  # another seed, other patients


@pytest.mark.parametrize("selection", ["window", "even"])
def test_frame_cap_limits_the_distinct_frames_each_video_gives(video_root, tmp_path, selection):  # noqa: F811
    dm = make_dm(video_root, tmp_path, frames_per_video=5, frame_selection=selection, samples_per_video=40,
                 output_dir=str(tmp_path / "out"))
    full = make_dm(video_root, tmp_path)
    read: dict[int, set[int]] = {}
    dataset = dm.train_set
    for i in range(len(dataset)):  # the cached frames every pair reads
        video = dataset.videos[i % len(dataset.videos)]
        spec = dataset.pair_spec(i, np.random.default_rng([dataset.seed, 0, i]))
        read.setdefault(i % len(dataset.videos), set()).update(video.cache_index(k) for k in spec.frame_indices())
    for index, frames in read.items():
        video, whole = dm.train_set.videos[index], full.train_set.videos[index]
        assert video.n_frames == 5 and len(frames) <= 5 and max(frames) < whole.n_frames
        allowed = {video.cache_index(k) for k in range(5)}
        assert frames <= allowed
        if selection == "window":  # contiguous
            assert max(allowed) - min(allowed) == 4
        else:  # spread over the whole video, evenly
            step = whole.n_frames // 5
            assert sorted(allowed) == list(range(min(allowed), min(allowed) + 5 * step, step))
            assert video.stride == step  # temporal pairs count gaps in the spaced frames' real spacing
    if selection == "window":  # at a seeded position, not always the start
        assert len({v.first for v in dm.train_set.videos}) > 1
    record = json.loads((tmp_path / "out" / TRAINING_DATA_FILE).read_text())
    assert {v["frames"] for v in record["videos"]} == {5} and record["settings"]["frames_per_video"] == 5


def test_a_pair_budget_gives_the_same_number_of_pairs_whatever_the_patients(video_root, tmp_path):  # noqa: F811
    sizes = [len(make_dm(video_root, tmp_path, patient_fraction=f, pairs_per_epoch=50).train_set)
             for f in (0.34, 1.0)]
    assert sizes == [50, 50]
    assert len(make_dm(video_root, tmp_path, pairs_per_epoch=None).train_set) == 6 * len(
        make_dm(video_root, tmp_path).train_set.videos)  # default: samples_per_video x videos
    assert len(LAYOUT) == 5
