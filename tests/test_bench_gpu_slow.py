"""scripts/bench/gpu.py --smoke: the GPU benchmark runs end to end on CPU, so it cannot rot before a GPU arrives."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_writes_every_point_and_the_loader_ratios(tmp_path):
    out = tmp_path / "smoke.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "gpu.py"), "--smoke", "--out", str(out),
                    "--work", str(tmp_path / "work")], check=True, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    assert report["smoke"] and report["device"] == "cpu"
    points = {(r["method_name"], r["compile"], r["mode"]) for r in report["runs"]}
    assert points == {(m, False, mode) for m in ("barlowtwins", "byol")
                      for mode in ("lightning_memory", "lightning_loader")}
    assert all(r["images_per_s"] > 0 and r["peak_rss_mib"] > 0 and r["peak_gpu_mib"] is None for r in report["runs"])
    assert {r["method"] for r in report["runs"]} == {"fetalssl.methods.two_view.TwoViewMethod",
                                                     "fetalssl.methods.online_target.OnlineTargetMethod"}
    for name, ratio in report["loader_over_memory"].items():
        point = {r["mode"]: r for r in report["runs"] if f"{r['method_name']}/compile={r['compile']}" == name}
        assert ratio == pytest.approx(point["lightning_loader"]["images_per_s"] / point["lightning_memory"]["images_per_s"])
