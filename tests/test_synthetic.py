import csv
import itertools
from pathlib import Path

import cv2
import decord
import numpy as np
import pytest
from skimage.feature import hog
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fetalssl.cli import demo_data
from fetalssl.demo import generate as synthetic
from fetalssl.demo.generate import DemoDataSpec, file_digests
from fetalssl.demo.generate import generate_demo_data as _generate
from fetalssl.demo.render import MIN_SWEEP_FRAMES, PLANES, TRANSITION, render_plane_image

SMALL = dict(
    video_patients=2,
    videos_per_patient=2,
    frames=40,
    size=64,
    fps=20.0,
    still_patients=4,
    stills=23,
    still_size=64,
    overlap=1,
    avi_every=2,
)


PLAIN_CLIPS = dict(frame_counter=False, doppler_clips=0, split_screen_clips=0)


def generate_demo_data(out, seed, overwrite=False, **params):
    return _generate(out, DemoDataSpec(seed=seed, **{**PLAIN_CLIPS, **params}), overwrite)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    a = generate_demo_data(root / "a", seed=7, **SMALL)
    generate_demo_data(root / "b", seed=7, **SMALL)
    generate_demo_data(root / "c", seed=8, **SMALL)
    return root, a


def test_same_seed_byte_identical_different_seed_differs(small_sets):
    root, _ = small_sets
    a, b, c = (file_digests(root / k) for k in "abc")
    assert a == b
    assert a.keys() == c.keys()
    media = [k for k in a if k.endswith((".mp4", ".avi", ".png"))]
    assert len(media) == 4 + 23
    assert all(a[k] != c[k] for k in media)


def test_videos_decode_to_csv_frame_count_and_sweep_all_planes(small_sets):
    root, summary = small_sets
    out = root / "a"
    assert sorted(Path(v).suffix for v in summary.videos) == [".avi", ".avi", ".mp4", ".mp4"]
    for rel in summary.videos:
        rows = _read_csv((out / rel).with_suffix(".csv"))
        assert [int(r["frame"]) for r in rows] == list(range(SMALL["frames"]))
        vr = decord.VideoReader(str(out / rel))
        assert len(vr) == len(rows)
        assert vr.get_avg_fps() == pytest.approx(SMALL["fps"])
        assert vr[0].shape == (SMALL["size"], SMALL["size"], 3)
        segments = [k for k, _ in itertools.groupby(r["plane"] for r in rows)]
        expected = [x for p in PLANES for x in (p, TRANSITION)][:-1]
        assert segments == expected


def test_decord_frame_count_over_awkward_lengths(tmp_path):
    # h264 with B-frames: the last frames must not get lost for any length.
    rng = np.random.default_rng(0)
    for n, suffix in itertools.product((1, 2, 7, 33), (".mp4", ".avi")):
        path = tmp_path / f"v{n}{suffix}"
        synthetic.write_video(path, rng.integers(0, 255, (n, 32, 48), dtype=np.uint8), fps=25.0)
        assert len(decord.VideoReader(str(path))) == n, path.name


def test_labels_balanced_paths_exist_patients_mostly_disjoint(small_sets):
    root, summary = small_sets
    out = root / "a"
    rows = _read_csv(out / "labels.csv")
    counts = {p: sum(r["label"] == p for r in rows) for p in PLANES}
    assert len(rows) == SMALL["stills"] and max(counts.values()) - min(counts.values()) <= 1
    for r in rows:
        path = out / r["image_path"]
        assert path.is_file()
        assert path.parent.name == r["label"] and path.name.startswith(r["patient_id"] + "_")
        assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape == (SMALL["still_size"],) * 2
    video_patients = {Path(v).parent.name for v in summary.videos}
    still_patients = {r["patient_id"] for r in rows}
    assert len(video_patients & still_patients) == SMALL["overlap"]
    assert (out / synthetic.MANIFEST_NAME).is_file()


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    out = tmp_path_factory.mktemp("stills") / "d"
    generate_demo_data(
        out,
        seed=3,
        video_patients=0,
        videos_per_patient=0,
        frames=0,
        size=64,
        fps=20.0,
        still_patients=30,
        stills=300,
        still_size=128,
        overlap=0,
        avi_every=0,
    )
    rows = _read_csv(out / "labels.csv")
    images = np.stack(
        [
            cv2.resize(
                cv2.imread(str(out / r["image_path"]), cv2.IMREAD_GRAYSCALE),
                (64, 64),
                interpolation=cv2.INTER_AREA,
            )
            for r in rows
        ]
    )
    labels = np.array([PLANES.index(r["label"]) for r in rows])
    groups = np.array([r["patient_id"] for r in rows])
    return images, labels, groups


def _grouped_macro_f1(features, labels, groups, c) -> float:
    pred = np.empty_like(labels)
    for train, test in GroupKFold(n_splits=5).split(features, labels, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        pred[test] = model.fit(features[train], labels[train]).predict(features[test])
    return f1_score(labels, pred, average="macro")


def test_intensity_statistics_do_not_give_the_plane_away(stills):
    images, labels, groups = stills
    flat = images.reshape(len(images), -1).astype(np.float32)
    stats = np.stack([flat.mean(1), flat.std(1)], axis=1)
    assert _grouped_macro_f1(stats, labels, groups, c=1.0) <= 0.35


def test_planes_learnable_from_shape_on_held_out_patients(stills):
    images, labels, groups = stills
    feats = np.stack(
        [hog(im, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2)) for im in images]
    )
    assert _grouped_macro_f1(feats, labels, groups, c=0.1) >= 0.8


def test_render_plane_image_is_deterministic_and_validates_plane():
    a = render_plane_image("3VT", size=96, rng=np.random.default_rng(1))
    b = render_plane_image("3VT", size=96, rng=np.random.default_rng(1))
    assert a.dtype == np.uint8 and a.shape == (96, 96)
    np.testing.assert_array_equal(a, b)
    assert (a[25:40, :2] == 0).all()  # beside the fan is black
    assert a[30:70, 30:66].mean() > 20  # inside it is not
    with pytest.raises(ValueError, match="unknown plane"):
        render_plane_image("5CH", size=64, rng=np.random.default_rng(0))


def test_bad_parameters_fail_before_anything_is_written(tmp_path):
    bad_frames = dict(SMALL, frames=MIN_SWEEP_FRAMES - 1)
    with pytest.raises(ValueError, match="at least"):
        generate_demo_data(tmp_path / "x", seed=0, **bad_frames)
    with pytest.raises(ValueError, match="even"):
        generate_demo_data(tmp_path / "y", seed=0, **dict(SMALL, size=63))
    with pytest.raises(ValueError, match="stills must be >= 0"):
        generate_demo_data(tmp_path / "z", seed=0, **dict(SMALL, stills=-1))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_run_leaves_no_complete_looking_output(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "write_video", boom)
    with pytest.raises(RuntimeError):
        generate_demo_data(tmp_path / "out", seed=0, **SMALL)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    generate_demo_data(tmp_path / "out", seed=0, **SMALL)
    assert (tmp_path / "out" / synthetic.MANIFEST_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # stale staging dir was cleaned up


def test_cli_refuses_non_empty_out_unless_overwrite(tmp_path, capsys):
    args = [
        str(tmp_path / "o"),
        "--patients",
        "1",
        "--videos-per-patient",
        "1",
        "--frames",
        "30",
        "--size",
        "32",
        "--still-patients",
        "2",
        "--stills",
        "5",
        "--still-size",
        "32",
        "--overlap",
        "0",
    ]
    assert demo_data.main(args) == 0
    (tmp_path / "o" / "marker").write_text("x")
    assert demo_data.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert demo_data.main([*args, "--overwrite"]) == 0
    assert not (tmp_path / "o" / "marker").exists()
    rows = _read_csv(tmp_path / "o" / "labels.csv")
    assert sorted(r["label"] for r in rows) == sorted(PLANES)
