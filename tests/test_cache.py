"""Frame cache: decode once, reuse when fresh, rebuild when stale, skip bad files, survive crashes."""

import json
import logging
import os

import av
import numpy as np
import pytest

from conftest import scan_options
from fetalssl.data import cache as cache_module
from fetalssl.data.cache import CacheError, build_cache, load_cache, load_index
from fetalssl.data.index import VideoRecord
from test_video import frame_value, write_video

KEEP = scan_options("keep")


def records_for(*paths):
    return [VideoRecord(p, patient_id=p.stem) for p in paths]


@pytest.fixture
def good_videos(tmp_path):
    return [
        write_video(tmp_path / "src" / "a.mp4", n_frames=30),
        write_video(tmp_path / "src" / "b.avi", n_frames=21, size=(48, 96)),
    ]


def zero_frame_video(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    return path


def test_build_decodes_resizes_and_strides(tmp_path, good_videos):
    summary = build_cache(records_for(*good_videos), tmp_path / "cache", short_side=32, stride=5, rgb=False, min_decoded_fraction=0.9, scan=KEEP)
    assert (summary.videos_read, summary.built, summary.reused, summary.skipped) == (2, 2, 0, [])
    a, b = summary.videos
    assert (a.n_frames, b.n_frames) == (6, 5) and summary.frames_cached == 11  # ceil(30/5), ceil(21/5)
    assert a.stride == 5 and a.fps == pytest.approx(10.0) and a.patient_id == "a"
    frames = a.frames()
    assert isinstance(frames, np.memmap) and frames.shape == (6, 32, 40) and frames.dtype == np.uint8
    assert b.frames().shape == (5, 32, 64)
    np.testing.assert_allclose(
        frames[:, 20:].mean(axis=(1, 2)), [frame_value(k) for k in range(0, 30, 5)], atol=3
    )
    rgb = build_cache(records_for(good_videos[0]), tmp_path / "cache", short_side=32, stride=5, rgb=True, min_decoded_fraction=0.9, scan=KEEP)
    assert rgb.videos[0].frames().shape == (6, 32, 40, 3)
    assert [
        v.frames_file for v in load_cache(records_for(*good_videos), tmp_path / "cache", 32, 5, False, KEEP)
    ] == [
        a.frames_file,
        b.frames_file,
    ]


def test_fresh_entries_are_reused_not_rewritten(tmp_path, good_videos):
    build_cache(records_for(*good_videos), tmp_path / "cache", 32, 2, False, min_decoded_fraction=0.9, scan=KEEP)
    files = sorted((tmp_path / "cache" / "frames").glob("*.npy"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = build_cache(records_for(*good_videos), tmp_path / "cache", 32, 2, False, min_decoded_fraction=0.9, scan=KEEP)
    assert (again.built, again.reused) == (0, 2)
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_touched_source_or_new_params_rebuild(tmp_path, good_videos):
    cache_dir = tmp_path / "cache"
    first = build_cache(records_for(*good_videos), cache_dir, 32, 2, False, min_decoded_fraction=0.9, scan=KEEP)
    stat = good_videos[0].stat()
    os.utime(good_videos[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch
    touched = build_cache(records_for(*good_videos), cache_dir, 32, 2, False, min_decoded_fraction=0.9, scan=KEEP)
    assert (touched.built, touched.reused) == (1, 1)
    assert touched.videos[0].frames_file == first.videos[0].frames_file  # same key, refreshed in place
    resized = build_cache(records_for(*good_videos), cache_dir, 16, 2, False, min_decoded_fraction=0.9, scan=KEEP)
    assert (resized.built, resized.reused) == (2, 0) and resized.videos[0].frames().shape[1] == 16
    # both parameter sets stay available side by side
    assert load_cache(records_for(*good_videos), cache_dir, 32, 2, False, KEEP)[0].frames().shape[1] == 32


def test_bad_inputs_skipped_with_one_warning_each(tmp_path, good_videos, caplog):
    source = good_videos[0].read_bytes()
    truncated = tmp_path / "src" / "truncated.mp4"
    truncated.write_bytes(source[: len(source) // 3])
    random_bytes = tmp_path / "src" / "random.avi"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(20_000))
    zero = zero_frame_video(tmp_path / "src" / "zero.avi")
    missing = tmp_path / "src" / "missing.mp4"
    bad = [truncated, random_bytes, zero, missing]
    with caplog.at_level(logging.WARNING, logger="fetalssl.data.cache"):
        summary = build_cache(records_for(*good_videos, *bad), tmp_path / "cache", 32, 1, False, min_decoded_fraction=0.9, scan=KEEP)
    assert summary.videos_read == 2 and [path for path, _ in summary.skipped] == bad
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4 and all(path.name in w for path, w in zip(bad, warnings, strict=True))
    assert "zero.avi" in str(summary) and "no video frames" in dict(summary.skipped)[zero]


def test_all_bad_raises_naming_files(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(CacheError, match="junk.mp4"):
        build_cache(records_for(junk), tmp_path / "cache", 32, 1, False, min_decoded_fraction=0.9, scan=KEEP)


def test_crash_mid_write_leaves_no_readable_half_entry(tmp_path, good_videos, monkeypatch):
    cache_dir = tmp_path / "cache"
    real_save = np.save

    def save_half_then_die(file, array):
        if array.shape[0] == 21:  # the second video (b.avi)
            real_save(file, array[:5])  # partial bytes reach the temp file...
            raise KeyboardInterrupt  # ...then the process is interrupted
        real_save(file, array)

    monkeypatch.setattr(cache_module.np, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_cache(records_for(*good_videos), cache_dir, 32, 1, False, min_decoded_fraction=0.9, scan=KEEP)
    monkeypatch.undo()
    entries = json.loads((cache_dir / "index.json").read_text())["entries"]
    assert len(entries) == 1  # only the completed first video is indexed
    assert list((cache_dir / "frames").glob("*.npy")) == [cache_dir / next(iter(entries.values()))["file"]]
    assert not list(cache_dir.rglob("*.tmp"))
    assert [v.source for v in load_cache(records_for(*good_videos), cache_dir, 32, 1, False, KEEP)] == [
        good_videos[0]
    ]
    resumed = build_cache(records_for(*good_videos), cache_dir, 32, 1, False, min_decoded_fraction=0.9, scan=KEEP)
    assert (resumed.built, resumed.reused) == (1, 1) and resumed.videos[1].frames().shape == (21, 32, 64)



@pytest.mark.parametrize("every_seconds, writes", [(3600.0, 1), (0.0, 2)])
def test_the_index_is_written_periodically_not_after_every_video(tmp_path, good_videos, monkeypatch, every_seconds,
                                                                  writes):
    # rewriting all entries after each of N videos made preparing thousands of videos quadratic
    written = []
    monkeypatch.setattr(cache_module, "INDEX_WRITE_EVERY_SECONDS", every_seconds)
    monkeypatch.setattr(cache_module, "_write_index", lambda d, entries: written.append(dict(entries)))
    build_cache(records_for(*good_videos), tmp_path / "cache", 32, 1, False, min_decoded_fraction=0.9, scan=KEEP)
    assert len(written) == writes and len(written[-1]) == len(good_videos)  # the last write holds every video

def test_orphan_temp_and_corrupt_entry_are_not_trusted(tmp_path, good_videos):
    cache_dir = tmp_path / "cache"
    summary = build_cache(records_for(good_videos[0]), cache_dir, 32, 1, False, min_decoded_fraction=0.9, scan=KEEP)
    (cache_dir / "frames" / "x.npy.123.tmp").write_bytes(b"half")  # left by a hard kill (no finally)
    summary.videos[0].frames_file.write_bytes(b"\x93NUMPY garbage")  # damaged entry file
    rebuilt = build_cache(records_for(good_videos[0]), cache_dir, 32, 1, False, min_decoded_fraction=0.9, scan=KEEP)
    assert rebuilt.built == 1 and rebuilt.videos[0].frames().shape == (30, 32, 40)
    assert not list(cache_dir.rglob("*.tmp"))


def test_load_cache_without_build_is_a_clear_error(tmp_path, good_videos):
    with pytest.raises(CacheError, match="build the cache"):
        load_cache(records_for(*good_videos), tmp_path / "empty", 32, 1, False, KEEP)


def test_a_video_shorter_than_its_container_declares_is_named_and_kept_or_skipped_by_the_threshold(tmp_path):
    from fetalssl.demo.generate import write_video as write_demo_video

    whole = tmp_path / "src" / "whole.avi"
    whole.parent.mkdir(parents=True)
    write_demo_video(whole, np.random.default_rng(0).integers(0, 255, (120, 48, 64), dtype=np.uint8), fps=20)
    cut = tmp_path / "src" / "cut.avi"  # the AVI header still says 120 frames
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    summary = build_cache(records_for(whole, cut), tmp_path / "cache", 32, 1, False, min_decoded_fraction=0.9, scan=KEEP)
    assert [v.source.name for v in summary.videos] == ["whole.avi"]
    [(path, reason)] = summary.skipped
    assert path == cut and "of the 120 frames its container declares" in reason and "min_decoded_fraction=0.9" in reason
    kept = build_cache(records_for(cut), tmp_path / "cache2", 32, 1, False, min_decoded_fraction=0.3, scan=KEEP)
    [(path, reason)] = kept.truncated
    assert path == cut and kept.videos[0].n_frames < 120 and "truncated" in str(kept)


def test_parallel_decoding_gives_the_same_cache_summary_and_order_as_one_process(tmp_path, good_videos):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    records = records_for(good_videos[1], bad, good_videos[0])
    one = build_cache(records, tmp_path / "one", short_side=32, stride=5, rgb=False, min_decoded_fraction=0.9,
                      scan=KEEP, workers=1)
    two = build_cache(records, tmp_path / "two", short_side=32, stride=5, rgb=False, min_decoded_fraction=0.9,
                      scan=KEEP, workers=2)
    assert [v.source for v in two.videos] == [v.source for v in one.videos] == [good_videos[1], good_videos[0]]
    assert [path for path, _ in two.skipped] == [path for path, _ in one.skipped] == [bad]
    assert (two.built, two.reused) == (one.built, one.reused) == (2, 0)
    for a, b in zip(one.videos, two.videos, strict=True):
        assert np.array_equal(a.frames(), b.frames()) and a.moments == b.moments
    index = {k: {f: v for f, v in e.items() if f != "mtime_ns"} for k, e in load_index(tmp_path / "two").items()}
    assert index == {k: {f: v for f, v in e.items() if f != "mtime_ns"} for k, e in load_index(tmp_path / "one").items()}
    again = build_cache(records, tmp_path / "two", short_side=32, stride=5, rgb=False, min_decoded_fraction=0.9,
                        scan=KEEP, workers=2)
    assert (again.built, again.reused) == (0, 2)  # the parallel run's cache is reused
