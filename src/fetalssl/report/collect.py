"""Collect fine-tuning results (metrics.json files) from a sweep directory.

A sweep directory is anything containing run directories: a Hydra multirun dir (``multirun.yaml`` plus
``<job_num>/.hydra/``), a parent of several multiruns, or a hand-made tree. Every problem found along the
way (failed run, interrupted run, unreadable metrics.json, grid point never run) is recorded rather than
raised, so one broken run never hides the others from the report.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
HYDRA_DIR = ".hydra"
MULTIRUN_FILE = "multirun.yaml"
# Sections of metrics.json whose numeric leaves are collected (frame-level test and, if present, video-level).
METRIC_SECTIONS = ("test", "test_video", "calibration")
# Grid keys every successful run must carry: they define a table cell (and the seed it averages over).
REQUIRED_GRID_KEYS = ("init", "fraction", "finetune_mode", "seed")
KNOWN_STATUSES = ("ok", "failed")
OBSERVED_GRID = "observed grid"  # MissingGridPoint.source when no multirun.yaml defined the expected grid


@dataclass(frozen=True)
class RunRecord:
    """One parsed metrics.json."""

    path: Path
    status: str
    grid: dict[str, Any]
    metrics: dict[str, float]
    error: str | None = None

    @property
    def out_dir(self) -> Path:
        """Directory holding this run's artefacts (confusion_matrix.csv, predictions.csv...)."""
        return self.path.parent


@dataclass(frozen=True)
class IncompleteRun:
    """A run directory (has ``.hydra/``) that never wrote metrics.json: crashed hard, killed or still running."""

    run_dir: Path
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class MalformedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class MissingGridPoint:
    """An expected combination with no run: ``values`` are grid values or Hydra override strings."""

    values: dict[str, str]
    source: str  # where the expectation came from: a multirun.yaml path or OBSERVED_GRID


@dataclass
class SweepResults:
    root: Path
    ok: list[RunRecord] = field(default_factory=list)
    failed: list[RunRecord] = field(default_factory=list)
    incomplete: list[IncompleteRun] = field(default_factory=list)
    malformed: list[MalformedFile] = field(default_factory=list)
    duplicates: list[RunRecord] = field(default_factory=list)
    missing_grid_points: list[MissingGridPoint] = field(default_factory=list)

    @property
    def n_metrics_files(self) -> int:
        return len(self.ok) + len(self.failed) + len(self.malformed) + len(self.duplicates)


class MetricsFormatError(ValueError):
    """metrics.json parsed as JSON but does not follow the contract."""


def _flatten_numbers(prefix: str, value: Any, out: dict[str, float], source: Path) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten_numbers(f"{prefix}.{key}", sub, out, source)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            out[prefix] = float(value)
        else:
            # A NaN score means the run broke; averaging it in would poison the whole cell.
            logger.warning("%s: %s is %s, ignored", source, prefix, value)


def _validated_grid(grid: Any, status: str) -> dict[str, Any]:
    if not isinstance(grid, Mapping):
        raise MetricsFormatError(f'"grid" must be an object, got {type(grid).__name__}')
    grid = dict(grid)
    if status != "ok":
        # A failed run may have died before its grid was fully known: list it as is, fraction best effort.
        try:
            grid["fraction"] = float(grid["fraction"])
        except (KeyError, TypeError, ValueError):
            pass
        return grid
    missing = [key for key in REQUIRED_GRID_KEYS if grid.get(key) is None]
    if missing:
        raise MetricsFormatError(f"grid lacks {', '.join(missing)}")
    try:
        grid["fraction"] = float(grid["fraction"])
    except (TypeError, ValueError) as exc:
        raise MetricsFormatError(f"grid.fraction {grid['fraction']!r} is not a number") from exc
    if not 0 < grid["fraction"] <= 1:
        raise MetricsFormatError(f"grid.fraction {grid['fraction']} is outside (0, 1]")
    return grid


def parse_metrics_file(path: Path) -> RunRecord:
    """Parse one metrics.json; raises MetricsFormatError / json.JSONDecodeError / OSError on bad input."""
    payload = json.loads(Path(path).read_text())
    if not isinstance(payload, Mapping):
        raise MetricsFormatError(f"top level must be an object, got {type(payload).__name__}")
    status = payload.get("status")
    if status not in KNOWN_STATUSES:
        raise MetricsFormatError(f"status {status!r} is not one of {KNOWN_STATUSES}")
    grid = _validated_grid(payload.get("grid", {}), status)
    metrics: dict[str, float] = {}
    for section in METRIC_SECTIONS:
        if section in payload and payload[section] is not None:
            _flatten_numbers(section, payload[section], metrics, path)
    if status == "ok" and not metrics:
        raise MetricsFormatError(f"status is ok but no numeric metrics under {METRIC_SECTIONS}")
    error = payload.get("error")
    return RunRecord(path=Path(path), status=status, grid=grid, metrics=metrics,
                     error=None if error is None else str(error))


def _walk(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Return (metrics files, run dirs, multirun.yaml files) under root, each sorted."""
    metrics_files, run_dirs, multirun_files = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if HYDRA_DIR in dirnames:
            run_dirs.append(here)
            dirnames.remove(HYDRA_DIR)  # only Hydra's own yaml lives there
        if METRICS_FILE in filenames:
            metrics_files.append(here / METRICS_FILE)
        if MULTIRUN_FILE in filenames:
            multirun_files.append(here / MULTIRUN_FILE)
        dirnames.sort()
    return sorted(metrics_files), sorted(run_dirs), sorted(multirun_files)


def _read_overrides(run_dir: Path) -> tuple[str, ...]:
    path = run_dir / HYDRA_DIR / "overrides.yaml"
    if not path.is_file():
        return ()
    try:
        overrides = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as exc:
        logger.warning("%s: unreadable (%s)", path, exc)
        return ()
    return tuple(str(o) for o in overrides)


def _owning_run_dir(metrics_path: Path, run_dirs: set[Path], root: Path) -> Path | None:
    """Nearest ancestor run dir: metrics.json may sit in a subfolder of the Hydra run dir."""
    for parent in metrics_path.parents:
        if parent in run_dirs:
            return parent
        if parent == root:
            return None
    return None


def _grid_identity(record: RunRecord) -> tuple:
    return tuple(sorted((key, str(value)) for key, value in record.grid.items()))


def _drop_duplicates(records: list[RunRecord]) -> tuple[list[RunRecord], list[RunRecord]]:
    """Keep the newest record per full grid (seed included) so a rerun is not averaged as an extra seed."""
    by_grid: dict[tuple, list[RunRecord]] = {}
    for record in records:
        by_grid.setdefault(_grid_identity(record), []).append(record)
    kept, dropped = [], []
    for group in by_grid.values():
        group.sort(key=lambda r: r.path.stat().st_mtime, reverse=True)
        kept.append(group[0])
        for older in group[1:]:
            logger.warning("%s duplicates the grid point of %s (newer), ignored", older.path, group[0].path)
            dropped.append(older)
    kept.sort(key=lambda r: r.path)
    return kept, dropped


def expected_jobs_from_multirun(multirun_yaml: Path) -> list[frozenset[str]]:
    """Job override sets a Hydra basic-sweeper multirun launches, rebuilt the way BasicSweeper does.

    Raises ValueError when the sweep cannot be expanded offline (glob(), interval(), other sweepers...).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    config = yaml.safe_load(Path(multirun_yaml).read_text()) or {}
    hydra_cfg = config.get("hydra") or {}
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    task = (hydra_cfg.get("overrides") or {}).get("task") or []
    arguments = [f"{key}={value}" for key, value in params.items()] + [str(t) for t in task]
    try:
        overrides = OverridesParser.create().parse_overrides(arguments)
        choices: dict[str, list[str]] = {}  # later overrides of the same key win, as in BasicSweeper
        for override in overrides:
            key = override.get_key_element()
            if override.is_sweep_override():
                if not override.is_discrete_sweep():
                    raise ValueError(f"{key}: non-discrete sweep")
                choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            else:
                choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    except HydraException as exc:
        raise ValueError(str(exc)) from exc
    return [frozenset(combo) for combo in itertools.product(*choices.values())]


def _missing_from_multiruns(
    multirun_files: Iterable[Path], run_dirs: list[Path]
) -> list[MissingGridPoint] | None:
    """Expected-but-absent jobs per multirun.yaml; None if any multirun could not be expanded."""
    missing = []
    for multirun in multirun_files:
        try:
            expected = expected_jobs_from_multirun(multirun)
        except (ValueError, OSError, yaml.YAMLError) as exc:
            logger.warning("%s: cannot expand the sweep (%s); using the observed grid instead", multirun, exc)
            return None
        sweep_dir = multirun.parent
        started = {frozenset(_read_overrides(d)) for d in run_dirs if d.is_relative_to(sweep_dir)}
        for job in expected:
            if job not in started:
                values = dict(sorted(o.split("=", 1) for o in job))
                missing.append(MissingGridPoint(values=values, source=str(multirun)))
    return missing


def label_axis(grid: Mapping[str, Any]) -> tuple[str, str]:
    """(init, method) travel together: a baseline init has no method, so they are one axis, not two."""
    return str(grid.get("init")), str(grid.get("method"))


def _missing_from_observed(records: list[RunRecord]) -> list[MissingGridPoint]:
    """Cartesian product of the observed values per grid axis, minus the points that have a result."""
    grids = [r.grid for r in records if all(r.grid.get(key) is not None for key in REQUIRED_GRID_KEYS)]
    if not grids:
        return []
    other_keys = sorted({key for g in grids for key in g} - {"init", "method"})
    axes = [sorted({label_axis(g) for g in grids})]
    axes += [sorted({str(g.get(key)) for g in grids}) for key in other_keys]
    seen = {(label_axis(g), *(str(g.get(key)) for key in other_keys)) for g in grids}
    missing = []
    for point in itertools.product(*axes):
        if point in seen:
            continue
        (init, method), *rest = point
        values = {"init": init, "method": method, **dict(zip(other_keys, rest, strict=True))}
        missing.append(MissingGridPoint(values={k: v for k, v in values.items() if v != "None"},
                                        source=OBSERVED_GRID))
    return missing


def collect_sweep(root: str | Path) -> SweepResults:
    """Find and parse every metrics.json under ``root`` (recursively) and list what is missing.

    Missing grid points come from each ``multirun.yaml`` found (jobs never started) when all can be
    expanded, otherwise from the cartesian product of the grid values observed in metrics.json files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {root} does not exist")
    metrics_files, run_dirs, multirun_files = _walk(root)
    results = SweepResults(root=root)
    run_dir_set = set(run_dirs)
    finished_run_dirs = set()
    parsed: list[RunRecord] = []
    for path in metrics_files:
        owner = _owning_run_dir(path, run_dir_set, root)
        if owner is not None:
            finished_run_dirs.add(owner)
        try:
            parsed.append(parse_metrics_file(path))
        except (json.JSONDecodeError, UnicodeDecodeError, MetricsFormatError, OSError) as exc:
            logger.warning("%s: skipped, %s", path, exc)
            results.malformed.append(MalformedFile(path=path, reason=str(exc)))
    parsed, results.duplicates = _drop_duplicates(parsed)
    results.ok = [r for r in parsed if r.status == "ok"]
    results.failed = [r for r in parsed if r.status == "failed"]
    results.incomplete = [IncompleteRun(run_dir=d, overrides=_read_overrides(d))
                          for d in run_dirs if d not in finished_run_dirs]
    from_multiruns = _missing_from_multiruns(multirun_files, run_dirs) if multirun_files else None
    results.missing_grid_points = (from_multiruns if from_multiruns is not None
                                   else _missing_from_observed(parsed))
    return results
