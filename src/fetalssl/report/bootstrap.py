"""Paired patient bootstrap of the difference between two inits' test scores.

With ~25 test videos from ~13 patients, which patients happen to be in the test set moves macro-F1 by several
points. A difference between two inits is only worth stating when it survives that. Both inits were tested on
the same images, so each resample draws the test patients with replacement once and scores every run of both
inits on it (each init's score = mean over its seeds); the interval is the 2.5 / 97.5 percentiles of the
difference B - A. Patients are drawn within their class (the label of their first row), as the split is
stratified: an unstratified draw often leaves a small class out entirely, and macro-F1 then jumps for reasons
that have nothing to do with the two inits. The observed difference is the one on the full test set, i.e. the difference of the
means in the results table.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fetalssl.evaluation import mean_per_video

PREDICTIONS_FILE = "predictions.csv"
PROB_PREFIX = "prob_"


@dataclass(frozen=True)
class TestPredictions:
    """One run's test predictions, row-aligned: a frame (or, after `per_video`, a video) per row."""

    keys: tuple[str, ...]  # image paths (frames) or video names
    patients: np.ndarray  # (N,) patient id of each row
    targets: np.ndarray  # (N,) class index
    probs: np.ndarray  # (N, C) class probabilities
    videos: np.ndarray  # (N,) video of each frame ("" when unknown)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)


def read_test_predictions(path: Path) -> TestPredictions:
    """A predictions.csv written by fine-tuning (needs the patient_id column)."""
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = list(reader)
    if "patient_id" not in columns:
        raise ValueError(f"{path}: no patient_id column (written before fetalssl recorded patients); rerun it")
    classes = [c[len(PROB_PREFIX):] for c in columns if c.startswith(PROB_PREFIX)]
    index = {c: i for i, c in enumerate(classes)}
    return TestPredictions(
        keys=tuple(r["image_path"] for r in rows),
        patients=np.array([r["patient_id"] for r in rows]),
        targets=np.array([index[r["label"]] for r in rows], dtype=np.int64),
        probs=np.array([[float(r[PROB_PREFIX + c]) for c in classes] for r in rows], dtype=np.float64),
        videos=np.array([r.get("video", "") for r in rows]))


def per_video(frames: TestPredictions) -> TestPredictions:
    """Video-level rows, computed as metrics.json's test_video is (evaluation.mean_per_video)."""
    if not frames.videos.size or (frames.videos == "").any():
        raise ValueError("video-level scores need the video of every frame (a labels CSV with a video column)")
    names, rows, targets, probs = mean_per_video(frames.videos.tolist(), frames.targets, frames.probs,
                                                 "predictions.csv")
    return TestPredictions(keys=tuple(names), patients=np.array([frames.patients[r[0]] for r in rows]),
                           targets=targets, probs=probs, videos=np.array(names))


def _confusion(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(targets * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def macro_f1(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes present in `targets` or `preds` (as torchmetrics / sklearn do)."""
    cm = _confusion(targets, preds, num_classes)
    support, predicted = cm.sum(1), cm.sum(0)
    seen = (support + predicted) > 0
    return float((2 * np.diag(cm)[seen] / (support + predicted)[seen]).mean())


def balanced_accuracy(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in `targets`."""
    cm = _confusion(targets, preds, num_classes)
    support = cm.sum(1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean())


SCORES: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "macro_f1": macro_f1, "balanced_accuracy": balanced_accuracy}


@dataclass(frozen=True)
class Difference:
    """Score of B minus score of A (fractions of 1), with the bootstrap interval."""

    observed: float
    low: float
    high: float
    n_patients: int
    n_resamples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(runs_a: Sequence[TestPredictions], runs_b: Sequence[TestPredictions], score: str,
                     n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Difference:
    """Difference mean-over-seeds score(B) - score(A), resampling test patients (see the module docstring)."""
    runs = [*runs_a, *runs_b]
    if not runs_a or not runs_b:
        raise ValueError("both sides need at least one run")
    reference = runs[0]
    for run in runs[1:]:
        if run.keys != reference.keys or not np.array_equal(run.targets, reference.targets):
            raise ValueError("runs were not tested on the same images in the same order: cannot pair them")
    score_fn, num_classes = SCORES[score], reference.probs.shape[1]
    targets = reference.targets
    preds_a, preds_b = [r.preds for r in runs_a], [r.preds for r in runs_b]

    def difference(rows: np.ndarray | slice) -> float:
        a = np.mean([score_fn(targets[rows], p[rows], num_classes) for p in preds_a])
        b = np.mean([score_fn(targets[rows], p[rows], num_classes) for p in preds_b])
        return float(b - a)

    patients = sorted(set(reference.patients.tolist()))
    rows_of = [np.flatnonzero(reference.patients == p) for p in patients]
    strata: dict[int, list[int]] = {}
    for i, rows in enumerate(rows_of):
        strata.setdefault(int(targets[rows[0]]), []).append(i)
    rng = np.random.default_rng(seed)

    def draw() -> np.ndarray:
        drawn = [i for members in strata.values() for i in rng.choice(members, len(members))]
        return np.concatenate([rows_of[i] for i in drawn])

    resampled = [difference(draw()) for _ in range(n_resamples)]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return Difference(observed=difference(slice(None)), low=float(low), high=float(high),
                      n_patients=len(patients), n_resamples=n_resamples)


@dataclass(frozen=True)
class Comparison:
    """B - A for one label fraction and metric ("test.macro_f1", "test_video.balanced_accuracy"); A and B are
    runs of finetune modes mode_a and mode_b (the same mode unless asked otherwise)."""

    label_a: str
    label_b: str
    mode_a: str
    mode_b: str
    fraction: float
    metric: str
    difference: Difference
    n_runs_a: int
    n_runs_b: int


def split_side(side: str) -> tuple[str, str | None]:
    """"ssl:barlowtwins@full" -> ("ssl:barlowtwins", "full"); "hog" -> ("hog", None)."""
    label, _, mode = side.partition("@")
    return label, mode or None


def compare(records: Sequence, labeller: Callable, side_a: str, side_b: str, metrics: Sequence[str],
            n_resamples: int = 2000) -> list[Comparison]:
    """Paired bootstraps of B - A per label fraction, for each metric of `metrics` that is a bootstrap score at
    frame ("test.") or video ("test_video.") level. A side is an init label, optionally "@mode": without modes A
    and B are paired within every finetune mode; "hog@linear" vs "ssl:barlowtwins@full" pairs across modes (a
    side without a mode takes the other side's)."""
    levels = {"test": lambda p: p, "test_video": per_video}
    wanted = [m for m in metrics if m.split(".", 1)[0] in levels and m.split(".", 1)[-1] in SCORES]
    (label_a, mode_a), (label_b, mode_b) = split_side(side_a), split_side(side_b)
    runs: dict[tuple[str, str, float], list[Path]] = {}
    for record in records:
        key = (labeller(record.grid), str(record.grid["finetune_mode"]), float(record.grid["fraction"]))
        runs.setdefault(key, []).append(record.out_dir / PREDICTIONS_FILE)
    if mode_a or mode_b:
        mode_pairs = [(mode_a or mode_b, mode_b or mode_a)]
    else:
        mode_pairs = [(mode, mode) for mode in sorted({m for (_, m, _) in runs})]
    comparisons = []
    for mode_pair in mode_pairs:
        for fraction in sorted({f for (_, _, f) in runs}):
            paths_a, paths_b = runs.get((label_a, mode_pair[0], fraction)), runs.get((label_b, mode_pair[1], fraction))
            if not paths_a or not paths_b:
                continue
            frames_a = [read_test_predictions(p) for p in sorted(paths_a)]
            frames_b = [read_test_predictions(p) for p in sorted(paths_b)]
            at_level = {section: ([to_level(r) for r in frames_a], [to_level(r) for r in frames_b])
                        for section, to_level in levels.items() if any(m.startswith(section + ".") for m in wanted)}
            for metric in wanted:
                section, score = metric.split(".", 1)
                difference = paired_bootstrap(*at_level[section], score, n_resamples)
                comparisons.append(Comparison(label_a, label_b, *mode_pair, fraction, metric, difference,
                                              len(paths_a), len(paths_b)))
    return comparisons


def _format_difference(d: Difference) -> str:
    text = f"{100 * d.observed:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"
    return f"**{text}**" if d.excludes_zero else text


def markdown_comparisons(comparisons: Sequence[Comparison]) -> str:
    """One table per (A, B, modes): rows = metric, columns = fraction; bold where the interval excludes 0."""
    parts = []
    for pair in sorted({(c.label_a, c.label_b, c.mode_a, c.mode_b) for c in comparisons}):
        label_a, label_b, mode_a, mode_b = pair
        group = [c for c in comparisons if (c.label_a, c.label_b, c.mode_a, c.mode_b) == pair]
        fractions = sorted({c.fraction for c in group})
        cell = {(c.metric, c.fraction): c for c in group}
        title = (f"{label_b} minus {label_a} — finetune_mode={mode_a}" if mode_a == mode_b
                 else f"{label_b} (finetune_mode={mode_b}) minus {label_a} (finetune_mode={mode_a})")
        lines = [f"## {title}", "",
                 f"Percent points: difference of the seed means on the test set [95% paired bootstrap interval, "
                 f"test patients resampled within their class: {group[0].difference.n_patients} patients, "
                 f"{group[0].difference.n_resamples} resamples]; bold where the interval excludes 0.", "",
                 "| metric | " + " | ".join(f"{f * 100:g}%" for f in fractions) + " |",
                 "|---|" + "---:|" * len(fractions)]
        for metric in dict.fromkeys(c.metric for c in group):
            lines.append(f"| {metric} | " + " | ".join(
                _format_difference(cell[(metric, f)].difference) if (metric, f) in cell else "–" for f in fractions)
                + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def write_comparisons_csv(comparisons: Sequence[Comparison], path: Path) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "mode_a", "mode_b", "fraction", "metric", "difference", "low", "high",
                         "n_patients", "n_runs_a", "n_runs_b"])
        for c in comparisons:
            d = c.difference
            writer.writerow([c.label_a, c.label_b, c.mode_a, c.mode_b, repr(c.fraction), c.metric,
                             repr(d.observed), repr(d.low), repr(d.high), d.n_patients, c.n_runs_a, c.n_runs_b])
