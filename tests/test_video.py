"""Video reading: containers through decord/PyAV, DICOM cine through pydicom, real POCUS files."""

import csv
import pickle
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from fetalssl.data.video import VideoReadError, is_dicom, open_video, read_frames

POCUS = Path(__file__).parents[2] / "shared" / "data" / "pocus"
CODECS = {".mp4": "h264", ".avi": "mpeg4", ".gif": "gif"}


def frame_value(k: int) -> int:
    """Brightness of frame k in the test videos: lets a test tell which frame it got back."""
    return 20 + 4 * k


def write_video(path: Path, n_frames: int = 40, size: tuple[int, int] = (64, 80), fps: int = 10) -> Path:
    """A tiny video whose frame k is uniform gray frame_value(k) plus a small moving square."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS[path.suffix], rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "rgb8" if path.suffix == ".gif" else "yuv420p"
        for k in range(n_frames):
            image = np.full((*size, 3), frame_value(k), np.uint8)
            image[4:12, 2 + k % 40 : 10 + k % 40] = 250
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def pocus_rows() -> list[dict]:
    if not (POCUS / "manifest.csv").exists():
        pytest.skip(f"POCUS data not found at {POCUS} (needs the shared data folder next to the repo)")
    with open(POCUS / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_container_video_frames_and_fps(tmp_path, suffix, backend):
    path = write_video(tmp_path / f"scan{suffix}", n_frames=40)
    video = open_video(path, backend=backend)
    assert len(video) == 40
    assert video.fps == pytest.approx(10.0)
    frames = video.get([0, 39, 7, 7])
    assert frames.shape == (4, 64, 80) and frames.dtype == np.uint8
    # the uniform background tells which frame was returned (lossy codec: a few grey levels of error)
    np.testing.assert_allclose(
        frames[:, 40:, :].mean(axis=(1, 2)), [frame_value(k) for k in (0, 39, 7, 7)], atol=3
    )
    rgb = open_video(path, rgb=True, backend=backend).get([5])
    assert rgb.shape == (1, 64, 80, 3)


def test_decord_and_pyav_agree(tmp_path):
    path = write_video(tmp_path / "scan.mp4", n_frames=30)
    a, fps_a = read_frames(path, backend="decord")
    b, fps_b = read_frames(path, backend="pyav")
    assert a.shape == b.shape == (30, 64, 80) and fps_a == fps_b
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


def test_gif_falls_back_to_pyav(tmp_path):
    path = write_video(tmp_path / "loop.gif", n_frames=12)
    with pytest.raises(VideoReadError, match="decord"):
        len(open_video(path, backend="decord"))
    frames, _ = read_frames(path)
    assert frames.shape == (12, 64, 80)
    np.testing.assert_allclose(
        frames[:, 40:, :].mean(axis=(1, 2)), [frame_value(k) for k in range(12)], atol=3
    )


def test_read_frames_stride_and_short_side(tmp_path):
    path = write_video(tmp_path / "scan.avi", n_frames=23)
    frames, fps = read_frames(path, stride=5, short_side=32)
    assert frames.shape == (5, 32, 40)  # frames 0, 5, 10, 15, 20; 64x80 -> 32x40
    np.testing.assert_allclose(
        frames[:, 20:, :].mean(axis=(1, 2)), [frame_value(k) for k in range(0, 23, 5)], atol=3
    )


def test_source_is_lazy_and_picklable_after_use(tmp_path):
    path = write_video(tmp_path / "scan.mp4", n_frames=10)
    video = open_video(path)
    assert video._reader is None  # nothing opened yet
    first = video.get([3])
    clone = pickle.loads(pickle.dumps(video))  # would fail if the decord reader travelled along
    assert clone._reader is None
    np.testing.assert_array_equal(clone.get([3]), first)


def test_out_of_range_and_missing_files(tmp_path):
    video = open_video(write_video(tmp_path / "scan.mp4", n_frames=10))
    with pytest.raises(IndexError, match="10"):
        video.get([10])
    with pytest.raises(VideoReadError, match="nothing.mp4"):
        len(open_video(tmp_path / "nothing.mp4"))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(VideoReadError, match="garbage.mp4"):
        read_frames(garbage)


def test_dicom_ybr_cine_is_converted(tmp_path):
    from pydicom import examples
    from pydicom.pixels import pixel_array

    source = Path(examples.ybr_color.filename)
    video = open_video(source, rgb=True)
    assert len(video) == 30 and video.fps == pytest.approx(30.0, abs=0.1)  # FrameTime 33.333 ms
    rgb = video.get(range(30))
    gray, _ = read_frames(source)
    assert rgb.shape == (30, 240, 320, 3) and gray.shape == (30, 240, 320)
    # Proper YBR->RGB conversion: our luma matches the stored Y channel, chroma is not mistaken for colour
    ybr = pixel_array(str(source), as_rgb=False)
    assert np.abs(gray.astype(int) - ybr[..., 0].astype(int)).mean() < 1.5
    assert abs(float(rgb.mean()) - float(ybr[..., 0].mean())) < 3  # raw YBR as RGB would average ~88
    # extensionless DICOM is recognised by its magic bytes
    bare = shutil.copy(source, tmp_path / "IM0001")
    assert is_dicom(Path(bare)) and len(open_video(bare)) == 30


def test_pocus_every_container_type_sample():
    """Fast check: every POCUS video opens with the manifest's frame count; two of each type fully decode."""
    rows = pocus_rows()
    for row in rows:
        n = len(open_video(POCUS / row["path"]))
        assert abs(n - int(row["n_frames"])) <= 1, row["path"]
    by_type: dict[str, list[dict]] = {}
    for row in rows:
        by_type.setdefault(Path(row["path"]).suffix.lower(), []).append(row)
    assert set(by_type) == {".mp4", ".avi", ".mpeg", ".gif", ".mov"}
    for suffix, group in by_type.items():
        for row in sorted(group, key=lambda r: int(r["n_frames"]))[:2]:  # shortest two
            frames, fps = read_frames(POCUS / row["path"], short_side=64)
            assert abs(len(frames) - int(row["n_frames"])) <= 1, (suffix, row["path"], len(frames))
            assert fps == pytest.approx(float(row["fps"]), rel=0.02)
            assert frames.dtype == np.uint8 and min(frames.shape[1:]) == 64 and frames.std() > 5


@pytest.mark.slow
def test_pocus_every_video_decodes_fully():
    rows = pocus_rows()
    for row in rows:
        frames, _ = read_frames(POCUS / row["path"], stride=1, short_side=64)
        assert abs(len(frames) - int(row["n_frames"])) <= 1, (row["path"], len(frames), row["n_frames"])
