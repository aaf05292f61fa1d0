"""fetalssl-report on a hand-made sweep directory with known numbers."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from fetalssl.cli.report import main
from fetalssl.report.collect import collect_sweep, expected_jobs_from_multirun
from fetalssl.report.plots import metric_vs_fraction_figure, read_confusion_matrix, sum_confusions
from fetalssl.report.tables import aggregate, make_labeller

CLASSES = ["4CH", "LVOT", "RVOT", "3VV", "3VT"]
INITS = [("ssl", "barlowtwins"), ("random", None), ("imagenet", None)]
FRACTIONS = [0.01, 0.1]
MODES = ["linear", "full"]
SEEDS = [0, 1, 2]
FAILED_POINT = ("random", 0.1, "full", 2)
MISSING_POINT = ("imagenet", 0.01, "full", 1)  # run dir with .hydra/ but no metrics.json


def known_macro_f1(init: str, fraction: float, mode: str, seed: int) -> float:
    """Distinct value per run; ssl is best at 1% and imagenet at 10% (for the bold check)."""
    base = {("ssl", 0.01): 0.70, ("random", 0.01): 0.40, ("imagenet", 0.01): 0.60,
            ("ssl", 0.1): 0.80, ("random", 0.1): 0.55, ("imagenet", 0.1): 0.85}[(init, fraction)]
    return base + (0.02 if mode == "full" else 0.0) + 0.013 * seed ** 2


def known_confusion(seed: int) -> np.ndarray:
    return np.eye(len(CLASSES), dtype=int) * (10 + seed) + 1


def write_run(run_dir: Path, payload: dict | str | None, overrides: list[str], confusion=None,
              confusion_row_names: bool = True) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if payload is not None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        (run_dir / "metrics.json").write_text(text)
    if confusion is not None:
        with open(run_dir / "confusion_matrix.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(([""] if confusion_row_names else []) + CLASSES)
            for name, row in zip(CLASSES, confusion, strict=True):
                writer.writerow(([name] if confusion_row_names else []) + list(row))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    job = 0
    for init, method in INITS:
        for fraction in FRACTIONS:
            for mode in MODES:
                for seed in SEEDS:
                    grid = {"init": init, "method": method, "fraction": fraction, "finetune_mode": mode,
                            "seed": seed, "backbone": "resnet18"}
                    overrides = [f"init={init}", f"fraction={fraction}", f"finetune_mode={mode}", f"seed={seed}"]
                    point = (init, fraction, mode, seed)
                    f1 = known_macro_f1(*point)
                    if point == FAILED_POINT:
                        payload = {"status": "failed", "grid": grid,
                                   "error": "Traceback ...\nRuntimeError: CUDA out of memory"}
                    elif point == MISSING_POINT:
                        payload = None
                    else:
                        payload = {"status": "ok", "grid": grid, "config_key": f"k{job}",
                                   "test": {"macro_f1": f1, "balanced_accuracy": f1 + 0.01, "accuracy": f1 + 0.02,
                                            "per_class_f1": dict.fromkeys(CLASSES, f1)},
                                   "val": {"macro_f1": 0.0},
                                   "calibration": {"n_bins": 15, "ece": f1 / 10, "bins": [{"count": 3}]}}
                    write_run(root / str(job), payload, overrides, confusion=known_confusion(seed),
                              confusion_row_names=seed % 2 == 0)
                    job += 1
    write_run(root / "broken", "{not json", ["init=ssl"])
    return root


def read_results_csv(path: Path) -> dict[tuple[str, float, str, str], dict[str, str]]:
    with open(path, newline="") as fh:
        return {(r["init"], float(r["fraction"]), r["mode"], r["metric"]): r for r in csv.DictReader(fh)}


def markdown_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """Rows of the table under ``heading``: label -> cells."""
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_collect_separates_ok_failed_incomplete_and_malformed(sweep: Path):
    results = collect_sweep(sweep)
    n_points = len(INITS) * len(FRACTIONS) * len(MODES) * len(SEEDS)
    assert len(results.ok) == n_points - 2
    assert [r.grid["seed"] for r in results.failed] == [FAILED_POINT[3]]
    assert "CUDA out of memory" in results.failed[0].error
    assert [r.run_dir.name for r in results.incomplete] == ["28"]  # job number of imagenet, 1%, full, seed 1
    assert [m.path.parent.name for m in results.malformed] == ["broken"]
    missing = [p.values for p in results.missing_grid_points]
    assert missing == [{"init": "imagenet", "backbone": "resnet18", "finetune_mode": "full",
                        "fraction": "0.01", "seed": "1"}]
    assert results.ok[0].metrics["test.per_class_f1.4CH"] == pytest.approx(results.ok[0].metrics["test.macro_f1"])
    assert not any(key.startswith("val.") for key in results.ok[0].metrics)


def test_cli_writes_tables_matching_numpy(sweep: Path, tmp_path: Path, capsys):
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0

    rows = read_results_csv(out / "results.csv")
    for init, method in INITS:
        label = f"{init}:{method}" if method else init
        for fraction in FRACTIONS:
            for mode in MODES:
                seeds = [s for s in SEEDS if (init, fraction, mode, s) not in (FAILED_POINT, MISSING_POINT)]
                values = np.array([known_macro_f1(init, fraction, mode, s) for s in seeds])
                row = rows[(label, fraction, mode, "test.macro_f1")]
                assert int(row["n"]) == len(seeds)
                assert float(row["mean"]) == pytest.approx(values.mean())
                assert float(row["std"]) == pytest.approx(values.std(ddof=1))
                assert float(rows[(label, fraction, mode, "test.accuracy")]["mean"]) == pytest.approx(
                    values.mean() + 0.02)

    markdown = (out / "results.md").read_text()
    assert markdown in capsys.readouterr().out
    linear = markdown_rows(markdown, "## test.macro_f1 — finetune_mode=linear")
    assert linear["init"] == ["1%", "10%"]
    ssl_1 = np.array([known_macro_f1("ssl", 0.01, "linear", s) for s in SEEDS]) * 100
    assert linear["ssl:barlowtwins"][0] == f"**{ssl_1.mean():.1f} ± {ssl_1.std(ddof=1):.1f}** (n=3)"
    bold = {label: [c.startswith("**") for c in cells] for label, cells in linear.items() if label != "init"}
    assert bold == {"ssl:barlowtwins": [True, False], "random": [False, False], "imagenet": [False, True]}

    problems = markdown.split("## Missing / failed runs", 1)[1]
    assert "### Failed runs (status \"failed\"): 1" in problems
    assert "RuntimeError: CUDA out of memory" in problems
    assert "### Incomplete runs" in problems and "init=imagenet fraction=0.01 finetune_mode=full seed=1" in problems
    assert "`broken/metrics.json`" in problems

    for name in ("f1_vs_fraction.png", "confusion_grid.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    with open(out / "runs.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(collect_sweep(sweep).ok)


def test_confusions_are_summed_over_seeds(sweep: Path):
    records = collect_sweep(sweep).ok
    confusions = sum_confusions(records, make_labeller(records), fractions=[0.1])
    assert {fraction for _, fraction, _ in confusions} == {0.1}
    summed = confusions[("random", 0.1, "full")]  # seed 2 failed there
    assert summed.n_runs == 2 and summed.classes == tuple(CLASSES)
    np.testing.assert_array_equal(summed.matrix, known_confusion(0) + known_confusion(1))


def test_read_confusion_matrix_formats_and_errors(tmp_path: Path):
    plain = tmp_path / "plain.csv"
    plain.write_text("a,b\n3,1\n0,4\n")
    classes, matrix = read_confusion_matrix(plain)
    assert classes == ["a", "b"]
    np.testing.assert_array_equal(matrix, [[3, 1], [0, 4]])
    swapped = tmp_path / "swapped.csv"
    swapped.write_text(",a,b\nb,3,1\na,0,4\n")
    with pytest.raises(ValueError, match="row classes"):
        read_confusion_matrix(swapped)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n3,x\n0,4\n")
    with pytest.raises(ValueError, match="row 2"):
        read_confusion_matrix(bad)


def test_newer_duplicate_replaces_older_run(sweep: Path, tmp_path: Path):
    original = sweep / "0" / "metrics.json"
    payload = json.loads(original.read_text())
    payload["test"]["macro_f1"] = 0.99
    rerun = sweep / "rerun" / "metrics.json"
    rerun.parent.mkdir()
    rerun.write_text(json.dumps(payload))
    os.utime(original, (0, 0))
    results = collect_sweep(sweep)
    assert [r.path for r in results.duplicates] == [original]
    cells = aggregate(results.ok, ["test.macro_f1"])
    cell = next(c for c in cells if (c.label, c.fraction, c.mode) == ("ssl:barlowtwins", 0.01, "linear"))
    assert cell.n == 3 and 0.99 in cell.values


def test_missing_jobs_from_multirun_yaml(tmp_path: Path):
    root = tmp_path / "multirun"
    root.mkdir()
    task = ["init=ssl,random", "seed=0,1", "trainer.max_epochs=1"]
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    jobs = [["init=ssl", "seed=0"], ["init=ssl", "seed=1"], ["init=random", "seed=0"], ["init=random", "seed=1"]]
    jobs = [job + ["trainer.max_epochs=1"] for job in jobs]
    assert expected_jobs_from_multirun(root / "multirun.yaml") == [frozenset(job) for job in jobs]
    for num, job in enumerate(jobs[:3]):
        grid = {"init": job[0].split("=")[1], "method": None, "fraction": 0.05, "finetune_mode": "linear",
                "seed": int(job[1].split("=")[1])}
        payload = None if num == 2 else {"status": "ok", "grid": grid, "test": {"macro_f1": 0.5}}
        write_run(root / str(num), payload, job)
    results = collect_sweep(root)
    assert len(results.ok) == 2
    assert [r.run_dir.name for r in results.incomplete] == ["2"]
    assert [p.values for p in results.missing_grid_points] == [
        {"init": "random", "seed": "1", "trainer.max_epochs": "1"}]


def test_cli_fails_clearly_without_metrics(tmp_path: Path, capsys):
    (tmp_path / "empty" / "0" / ".hydra").mkdir(parents=True)
    assert main([str(tmp_path / "empty")]) == 1
    assert "no metrics.json found" in capsys.readouterr().err
    assert main([str(tmp_path / "nonexistent")]) == 2


def test_cli_rejects_unknown_metric(sweep: Path, tmp_path: Path, capsys):
    assert main([str(sweep), "--out", str(tmp_path / "r"), "--metric", "auroc"]) == 2
    assert "test.auroc" in capsys.readouterr().err


def test_plot_keeps_one_colour_per_init_across_modes():
    """hog has linear runs only: the full panel must not shift every other init's colour, and the legend must
    list hog too."""
    from fetalssl.report.tables import Cell

    cells = [Cell(label, fraction, mode, "test.macro_f1", (0.5, 0.6))
             for mode in ("full", "linear") for label in ("hog", "random", "ssl:byol") for fraction in (0.01, 1.0)
             if not (label == "hog" and mode == "full")]
    fig = metric_vs_fraction_figure(cells, "test.macro_f1")
    colours = {}
    for ax in fig.axes:
        for container in ax.containers:
            colours.setdefault(container.get_label(), set()).add(container.lines[0].get_color())
    assert set(colours) == {"hog", "random", "ssl:byol"}
    assert all(len(c) == 1 for c in colours.values()) and len(set.union(*colours.values())) == 3
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["hog", "random", "ssl:byol"]


def test_plot_tells_apart_every_init_of_a_grid_over_all_methods():
    from fetalssl.report.tables import Cell

    labels = ["imagenet", "random", *(f"ssl:m{i:02d}" for i in range(14))]  # 16 lines, more than 10 colours
    cells = [Cell(label, fraction, "linear", "test.macro_f1", (0.5, 0.6)) for label in labels for fraction in (0.01, 1)]
    fig = metric_vs_fraction_figure(cells, "test.macro_f1")
    styles = {c.get_label(): (c.lines[0].get_color(), c.lines[0].get_marker(), c.lines[0].get_linestyle())
              for c in fig.axes[0].containers}
    assert sorted(styles) == sorted(labels) and len(set(styles.values())) == len(labels)


def test_report_tabulates_test_calibration_error_by_default(sweep: Path, tmp_path: Path):
    assert main([str(sweep), "--out", str(tmp_path / "r")]) == 0
    results = read_results_csv(tmp_path / "r" / "results.csv")
    point = ("random", FRACTIONS[0], MODES[0], "calibration.ece")
    expected = np.mean([known_macro_f1("random", FRACTIONS[0], MODES[0], seed) / 10 for seed in SEEDS])
    assert float(results[point]["mean"]) == pytest.approx(expected)
    assert (tmp_path / "r" / "calibration_ece_vs_fraction.png").is_file()
    # the best calibration is the lowest error: bold goes to the init with the lowest mean ECE in the column
    table = markdown_rows((tmp_path / "r" / "results.md").read_text(), f"## calibration.ece — finetune_mode={MODES[0]}")
    column = {label: cells[0] for label, cells in table.items() if label not in ("init", "---")}
    best = min(column, key=lambda label: float(column[label].strip("*").split()[0].strip("*")))
    assert column[best].startswith("**") and sum(cell.startswith("**") for cell in column.values()) == 1


def test_report_maps_each_frozen_inits_test_features_and_scores_how_they_separate_the_classes(tmp_path: Path):
    rng = np.random.default_rng(0)
    classes = np.repeat(CLASSES, 8)
    patients = np.tile([f"p{i}" for i in range(8)], len(CLASSES))
    centres = {c: rng.normal(size=16) * 5 for c in CLASSES}
    separable = np.stack([centres[c] + rng.normal(size=16) * 0.3 for c in classes])
    noise = rng.normal(size=(len(classes), 16))
    root = tmp_path / "sweep"
    for job, (init, method, seed, features) in enumerate([("ssl", "barlowtwins", 0, separable),
                                                          ("ssl", "barlowtwins", 1, noise),  # not the one drawn
                                                          ("random", None, 0, noise)]):
        grid = {"init": init, "method": method, "fraction": 0.1, "finetune_mode": "linear_cached", "seed": seed,
                "backbone": "resnet18"}
        write_run(root / str(job), {"status": "ok", "grid": grid, "test": {"macro_f1": 0.5}},
                  [f"init={init}", f"seed={seed}"])
        np.savez(root / str(job) / "test_embeddings.npz", features=features, labels=classes, patients=patients)
    assert main([str(root), "--out", str(tmp_path / "r")]) == 0
    with open(tmp_path / "r" / "embeddings.csv", newline="") as fh:
        rows = {r["init"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"ssl:barlowtwins", "random"} and rows["ssl:barlowtwins"]["source"].endswith("/0")
    assert float(rows["ssl:barlowtwins"]["knn_accuracy"]) == 1.0 and float(rows["ssl:barlowtwins"]["silhouette"]) > 0.5
    assert float(rows["random"]["knn_accuracy"]) < 0.6 and abs(float(rows["random"]["silhouette"])) < 0.1
    assert (tmp_path / "r" / "embeddings.png").stat().st_size > 0
    assert "| ssl:barlowtwins | 40 | 1.000 |" in (tmp_path / "r" / "results.md").read_text()



def test_report_scores_a_tiny_test_set_of_one_image_per_plane_without_failing(tmp_path: Path):
    # the demo-sized sweep: one test image per class, where the silhouette is undefined and k-NN has 4 neighbours
    root = tmp_path / "sweep"
    features = np.eye(len(CLASSES))
    features[1] = features[0]  # class 1's nearest neighbour is class 0's image: a wrong vote
    grid = {"init": "random", "method": None, "fraction": 0.1, "finetune_mode": "linear_cached", "seed": 0,
            "backbone": "resnet18"}
    write_run(root / "0", {"status": "ok", "grid": grid, "test": {"macro_f1": 0.5}}, ["init=random"])
    np.savez(root / "0" / "test_embeddings.npz", features=features, labels=np.array(CLASSES),
             patients=np.array([f"p{i}" for i in range(len(CLASSES))]))
    assert main([str(root), "--out", str(tmp_path / "r")]) == 0
    with open(tmp_path / "r" / "embeddings.csv", newline="") as fh:
        (row,) = csv.DictReader(fh)
    assert float(row["knn_accuracy"]) == 0.0  # every leave-one-out vote is a tie of distinct classes: all wrong
    assert np.isnan(float(row["silhouette"]))
    assert f"| random | {len(CLASSES)} | 0.000 | n/a |" in (tmp_path / "r" / "results.md").read_text()

class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.cards, self.strong = [], 0, [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        self.tables += tag == "table"
        self.strong += tag == "strong"
        if tag == "details":
            self.cards.append(attrs.get("class", ""))


def _report_html(sweep: Path, tmp_path: Path) -> tuple[Path, _Page]:
    run = next(p for p in sweep.iterdir() if (p / "metrics.json").is_file() and '"ok"' in (p / "metrics.json").read_text())
    matplotlib.image.imsave(run / "confusion_matrix.png", np.ones((8, 8, 3)))  # a run image the card links to
    assert main([str(sweep), "--out", str(tmp_path / "r")]) == 0
    page = _Page()
    path = tmp_path / "r" / "report.html"
    page.feed(path.read_text())
    return path, page


def test_html_report_holds_tables_figures_and_one_card_per_run_with_every_image_resolvable(sweep: Path, tmp_path):
    path, page = _report_html(sweep, tmp_path)
    results = collect_sweep(sweep)
    assert page.tables >= len(MODES) and page.strong > 0  # results tables, best mean per column in bold
    assert page.cards.count("run ok") == len(results.ok) and page.cards.count("run failed") == len(results.failed)
    assert "CUDA out of memory" in path.read_text()  # the failed run's card says why
    embedded = [src for src in page.images if src.startswith("data:image/png;base64,")]
    assert len(embedded) >= 2  # f1_vs_fraction.png and the confusion grid at least
    for src in embedded:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    linked = [src for src in page.images if not src.startswith("data:")]
    assert len(linked) == 1 and all((path.parent / src).is_file() for src in linked)


BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_or_install_chromium() -> str | None:
    """A headless-capable Chromium: the system's, or Debian's package installed now (root with apt-get only)."""
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    try:
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except subprocess.TimeoutExpired:
        pass  # the binary may be in place before the package triggers finish
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


@pytest.mark.slow  # may install Chromium first
def test_html_report_in_a_headless_browser_loads_every_image(sweep: Path, tmp_path):
    browser = find_or_install_chromium()
    if browser is None:
        pytest.skip("no Chromium: none installed, and it cannot be installed here (needs root and apt-get); the "
                    "page's images and tables are still checked by parsing")
    path, _ = _report_html(sweep, tmp_path)
    script = ("<script>window.onload=()=>{document.title=[...document.images].every(i=>i.complete&&i.naturalWidth>0)"
              "+':'+document.querySelectorAll('table').length}</script>")
    path.write_text(path.read_text().replace("</body>", script + "</body>"))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    title = dom.split("<title>", 1)[1].split("</title>", 1)[0]
    loaded, tables = title.split(":")
    assert loaded == "true" and int(tables) >= len(MODES)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={tmp_path / 'page.png'}",
                    "--window-size=1280,2000", path.as_uri()], capture_output=True, timeout=120)
    assert (tmp_path / "page.png").stat().st_size > 0
