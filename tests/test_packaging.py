"""The configs must ship inside the wheel: a plain (non-editable) install composes from any directory."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
    )
    (whl,) = out.glob("fetalssl-*.whl")
    return whl


def test_wheel_ships_every_config(wheel):
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("fetalssl/conf/")}
    on_disk = {f"fetalssl/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert on_disk and on_disk <= shipped


def test_installed_wheel_composes_from_unrelated_dir(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONPATH puts the installed copy before the editable one; the first line proves which one ran.
    code = "import fetalssl, sys; print(fetalssl.__file__); from fetalssl.cli.train import main; sys.argv[1:] = ['--cfg', 'job', 'method=simclr']; main()"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.splitlines()[0].startswith(str(site))
    assert "nt_xent" in out or "SimCLR" in out
