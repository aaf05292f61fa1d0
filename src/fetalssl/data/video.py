"""Reading ultrasound cine loops: container video (decord, PyAV fallback) and DICOM multi-frame (pydicom).

A `VideoSource` holds only a path until first used, so datasets can be pickled into DataLoader workers and each
worker opens its own decoder (a decord reader made in the parent hangs forked workers and cannot be pickled).
Every frame comes back as uint8, grayscale (T, H, W) by default or RGB (T, H, W, 3) on request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import av
import cv2
import numpy as np

log = logging.getLogger(__name__)

CONTAINER_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mpeg", ".mpg", ".gif"})
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
BACKENDS = ("auto", "decord", "pyav", "dicom")


class VideoReadError(Exception):
    """A video could not be opened or decoded; the message names the file."""


def is_dicom(path: Path) -> bool:
    """DICOM by extension, or an extensionless file carrying the 'DICM' magic at byte 128."""
    path = Path(path)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) RGB uint8 -> (..., H, W) luma (BT.601, as OpenCV)."""
    if rgb.ndim == 3:
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb])


def resize_short_side(frame: np.ndarray, short_side: int | None) -> np.ndarray:
    """Resize one frame so min(H, W) == short_side (area interpolation when shrinking); None keeps it."""
    if short_side is None:
        return frame
    h, w = frame.shape[:2]
    scale = short_side / min(h, w)
    if scale == 1:
        return frame
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


class _DecordReader:
    def __init__(self, path: Path):
        import decord

        try:
            self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises RuntimeError or its own DECORDError
            raise VideoReadError(f"{path}: decord cannot open it ({type(e).__name__})") from e
        self.path = path
        self.n_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())
        if self.n_frames == 0:
            raise VideoReadError(f"{path}: decord sees zero frames")

    def get(self, indices: Sequence[int]) -> np.ndarray:
        try:
            return self._vr.get_batch(list(indices)).asnumpy()
        except Exception as e:
            raise VideoReadError(f"{self.path}: decord failed decoding frames ({e})") from e

    def iter_rgb(self, stride: int) -> Iterator[np.ndarray]:
        chunk = 32 * stride  # bounded memory for long clips
        for start in range(0, self.n_frames, chunk):
            yield from self.get(range(start, min(start + chunk, self.n_frames), stride))


class _PyAVReader:
    """Sequential PyAV decoding; random access decodes from the start (slow: that is what the cache is for)."""

    def __init__(self, path: Path):
        import av

        self.path = path
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise VideoReadError(f"{path}: no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self.fps = float(rate) if rate else math.nan
                # Counting packets needs no decoding; stream.frames is 0 for e.g. MPEG-PS.
                self.n_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        except (av.FFmpegError, OSError) as e:
            raise VideoReadError(f"{path}: PyAV cannot open it ({type(e).__name__}: {e})") from e
        if self.n_frames == 0:
            raise VideoReadError(f"{path}: no video frames")

    def _frames(self) -> Iterator[np.ndarray]:
        import av

        try:
            with av.open(str(self.path)) as container:
                for frame in container.decode(video=0):
                    yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as e:
            raise VideoReadError(f"{self.path}: PyAV failed decoding ({type(e).__name__}: {e})") from e

    def get(self, indices: Sequence[int]) -> np.ndarray:
        wanted = sorted(set(indices))
        found: dict[int, np.ndarray] = {}
        for i, frame in enumerate(self._frames()):
            if i in wanted:
                found[i] = frame
            if i >= wanted[-1]:
                break
        missing = [i for i in wanted if i not in found]
        if missing:
            raise VideoReadError(f"{self.path}: frames {missing[:5]} past the decodable end")
        return np.stack([found[i] for i in indices])

    def iter_rgb(self, stride: int) -> Iterator[np.ndarray]:
        for i, frame in enumerate(self._frames()):
            if i % stride == 0:
                yield frame


class _DicomReader:
    """Whole cine decoded on first use (DICOM cines are short); YBR/palette converted to RGB by pydicom."""

    def __init__(self, path: Path):
        import pydicom
        from pydicom.pixels import pixel_array

        self.path = path
        try:
            ds = pydicom.dcmread(str(path))
            pixels = pixel_array(ds, as_rgb=True)
        except Exception as e:  # pydicom raises many types for broken/unsupported files
            raise VideoReadError(f"{path}: pydicom cannot decode it ({type(e).__name__}: {e})") from e
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        rgb = ds.get("SamplesPerPixel", 1) == 3
        if n_frames == 1:
            pixels = pixels[None]
        self._rgb = _dicom_to_uint8(pixels, ds) if rgb else None
        self._gray = None if rgb else _dicom_to_uint8(pixels, ds)
        self.n_frames = len(pixels)
        self.fps = _dicom_fps(ds)

    def get(self, indices: Sequence[int]) -> np.ndarray:
        if self._rgb is None:
            self._rgb = np.repeat(self._gray[..., None], 3, axis=-1)
        return self._rgb[list(indices)]

    def get_gray(self, indices: Sequence[int]) -> np.ndarray:
        if self._gray is None:
            self._gray = to_gray(self._rgb)
        return self._gray[list(indices)]

    def iter_rgb(self, stride: int) -> Iterator[np.ndarray]:
        yield from self.get(range(0, self.n_frames, stride))


def _dicom_to_uint8(pixels: np.ndarray, ds) -> np.ndarray:
    if pixels.dtype == np.uint8:
        out = pixels
    else:  # >8-bit monochrome: stretch the stored range into uint8
        lo, hi = float(pixels.min()), float(pixels.max())
        out = ((pixels.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1.0))).astype(np.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # 0 is white in MONOCHROME1
        out = 255 - out
    return np.ascontiguousarray(out)


def _dicom_fps(ds) -> float:
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        if ds.get(keyword):
            return float(ds.get(keyword))
    if ds.get("FrameTime"):  # milliseconds per frame
        return 1000.0 / float(ds.FrameTime)
    return math.nan


class VideoSource:
    """Lazy handle on one video: holds the path; the decoder opens on first use, in whichever process uses it."""

    def __init__(self, path: str | Path, rgb: bool = False, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown video backend {backend!r}; choose from {BACKENDS}")
        self.path = Path(path)
        self.rgb = rgb
        self.backend = backend
        self._reader = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}  # decoders never cross process boundaries

    @property
    def reader(self):
        if self._reader is None:
            self._reader = _open_reader(self.path, self.backend)
        return self._reader

    def __len__(self) -> int:
        return self.reader.n_frames

    @property
    def fps(self) -> float:
        return self.reader.fps

    def get(self, indices: Sequence[int]) -> np.ndarray:
        """Frames at `indices` (any order, repeats allowed) as uint8 (T,H,W) or (T,H,W,3)."""
        indices = list(indices)
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"{self.path}: frame indices {bad[:5]} outside [0, {len(self)})")
        if not self.rgb and isinstance(self.reader, _DicomReader):
            return self.reader.get_gray(indices)
        frames = self.reader.get(indices)
        return frames if self.rgb else to_gray(frames)


def _open_reader(path: Path, backend: str):
    if not path.is_file():
        raise VideoReadError(f"{path}: no such file")
    if backend == "dicom" or (backend == "auto" and is_dicom(path)):
        return _DicomReader(path)
    if backend == "pyav":
        return _PyAVReader(path)
    if backend == "decord" or path.suffix.lower() != ".gif":  # decord cannot open GIF at all
        try:
            return _DecordReader(path)
        except VideoReadError as e:
            if backend == "decord":
                raise
            log.debug("%s; falling back to PyAV", e)
    return _PyAVReader(path)


def open_video(path: str | Path, rgb: bool = False, backend: str = "auto") -> VideoSource:
    """Lazy, picklable video handle (nothing is opened or decoded until used)."""
    return VideoSource(path, rgb=rgb, backend=backend)


def declared_frame_count(path: str | Path) -> int | None:
    """How many frames the container's header says the video has (None when it does not say, or for DICOM,
    whose frame count is its pixel data's). A decoded count below it means a truncated or damaged file."""
    path = Path(path)
    if is_dicom(path):
        return None
    try:
        with av.open(str(path)) as container:
            frames = container.streams.video[0].frames if container.streams.video else 0
    except (av.error.FFmpegError, OSError):
        return None
    return int(frames) or None


def read_frames(
    path: str | Path, rgb: bool = False, stride: int = 1, short_side: int | None = None, backend: str = "auto"
) -> tuple[np.ndarray, float]:
    """Decode a whole video sequentially (every `stride`-th frame, optionally resized): (uint8 frames, source fps).

    With backend 'auto', a decord decoding failure mid-video is retried once with PyAV.
    """
    (frames,), fps = _decode_with_fallback(path, ("rgb" if rgb else "gray",), stride, short_side, backend)
    return frames, fps


def read_gray_and_colour(path: str | Path, stride: int = 1, short_side: int | None = None,
                         backend: str = "auto") -> tuple[np.ndarray, np.ndarray, float]:
    """One decoding pass: (grey frames exactly as `read_frames` gives them, the same frames in RGB, fps)."""
    (gray, colour), fps = _decode_with_fallback(path, ("gray", "rgb"), stride, short_side, backend)
    return gray, colour, fps


def _decode_with_fallback(path, kinds: tuple[str, ...], stride: int, short_side: int | None,
                          backend: str) -> tuple[list[np.ndarray], float]:
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    rgb = kinds == ("rgb",)
    source = open_video(path, rgb=rgb, backend=backend)
    try:
        return _decode_all(source.reader, kinds, stride, short_side), source.fps
    except VideoReadError:
        if backend != "auto" or not isinstance(source.reader, _DecordReader):
            raise
        log.debug("%s: decord failed mid-video, retrying with PyAV", path)
        source = open_video(path, rgb=rgb, backend="pyav")
        return _decode_all(source.reader, kinds, stride, short_side), source.fps


def _decode_all(reader, kinds: tuple[str, ...], stride: int, short_side: int | None) -> list[np.ndarray]:
    """Each kind ("gray": converted, then resized; "rgb": resized) of every `stride`-th frame, stacked."""
    out: list[list[np.ndarray]] = [[] for _ in kinds]
    for frame in reader.iter_rgb(stride):
        for frames, kind in zip(out, kinds, strict=True):
            frames.append(resize_short_side(frame if kind == "rgb" else to_gray(frame), short_side))
    if not out[0]:
        raise VideoReadError(f"{reader.path}: zero frames decoded")
    return [np.stack(frames) for frames in out]
