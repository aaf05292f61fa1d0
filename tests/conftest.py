import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BIN = Path(sys.executable).parent


def run_cli(name: str, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console script the way a user does (a subprocess: Hydra and Lightning own the process)."""
    result = subprocess.run([str(BIN / name), *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def small_demo_data(out: Path, video_patients: int) -> Path:
    """fetalssl-demo-data with one 30-frame 64 px video per video patient and 50 stills of 10 patients."""
    run_cli("fetalssl-demo-data", out, "--patients", video_patients, "--videos-per-patient", 1, "--frames", 30,
            "--size", 64, "--still-patients", 10, "--stills", 50, "--still-size", 64)
    return out


@pytest.fixture(scope="session")
def tiny_demo_data(tmp_path_factory) -> Path:
    """A small fetalssl-demo-data folder (2 video patients, 50 stills) shared by the CLI tests."""
    return small_demo_data(tmp_path_factory.mktemp("demo") / "data", video_patients=2)


def init_config(name: str):
    """conf/init/<name>.yaml as fetalssl-finetune composes it (with the weight keys every init shares)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("fetalssl.conf", version_base="1.3"):
        return compose("finetune", overrides=[f"init={name}", "data.root=unused"]).init


def scan_options(name: str = "keep", **overrides):
    """conf/scan/<name>.yaml instantiated (fetalssl.data.scan.ScanOptions), with top-level fields overridden."""
    from dataclasses import replace

    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("fetalssl.conf", version_base="1.3"):
        options = instantiate(compose("prepare", overrides=[f"scan={name}"]).scan)
    return replace(options, **overrides)


def data_groups(scan: str = "keep", normalization: str = "fixed") -> dict:
    """The top-level groups the data configs interpolate (${scan}, ${normalization.mean}), as YAML nodes."""
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "src" / "fetalssl" / "conf"
    options = OmegaConf.load(conf / "scan" / f"{scan}.yaml")
    if "defaults" in options:  # a choice on top of scan/keep.yaml (as Hydra composes it)
        options.pop("defaults")
        options = OmegaConf.merge(OmegaConf.load(conf / "scan" / "keep.yaml"), options)
    return {"scan": options,
            "normalization": OmegaConf.load(conf / "normalization" / f"{normalization}.yaml")}
