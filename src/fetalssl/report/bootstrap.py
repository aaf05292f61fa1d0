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
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fetalssl.evaluation import mean_per_video

logger = logging.getLogger(__name__)

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
    """Score of B minus score of A (fractions of 1), with the bootstrap interval. Under cross-validation the
    observed difference is the mean over folds of each fold's difference (`fold_differences`)."""

    observed: float
    low: float
    high: float
    n_patients: int
    n_resamples: int
    fold_differences: tuple[float, ...] = ()

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def fold_spread(self) -> float:
        """Sample std over folds of the per-fold differences; NaN without several folds."""
        return float(np.std(self.fold_differences, ddof=1)) if len(self.fold_differences) > 1 else float("nan")

    @property
    def within_fold_spread(self) -> bool:
        """The difference is smaller than its spread over folds: the folds do not agree on it."""
        return len(self.fold_differences) > 1 and abs(self.observed) < self.fold_spread


class _PairedTestSet:
    """Two inits' runs on one test set: their score difference on any resample of its patients."""

    def __init__(self, runs_a: Sequence[TestPredictions], runs_b: Sequence[TestPredictions], score: str):
        if not runs_a or not runs_b:
            raise ValueError("both sides need at least one run")
        reference = runs_a[0]
        for run in [*runs_a, *runs_b][1:]:
            if run.keys != reference.keys or not np.array_equal(run.targets, reference.targets):
                raise ValueError("runs were not tested on the same images in the same order: cannot pair them")
        self.score_fn, self.num_classes = SCORES[score], reference.probs.shape[1]
        self.targets = reference.targets
        self.preds_a, self.preds_b = [r.preds for r in runs_a], [r.preds for r in runs_b]
        self.patients = sorted(set(reference.patients.tolist()))
        self.rows_of = [np.flatnonzero(reference.patients == p) for p in self.patients]
        self.strata: dict[int, list[int]] = {}
        for i, rows in enumerate(self.rows_of):
            self.strata.setdefault(int(self.targets[rows[0]]), []).append(i)

    def difference(self, rows: np.ndarray | slice = slice(None)) -> float:
        """Mean over B's seeds minus mean over A's seeds, on these rows."""
        a = np.mean([self.score_fn(self.targets[rows], p[rows], self.num_classes) for p in self.preds_a])
        b = np.mean([self.score_fn(self.targets[rows], p[rows], self.num_classes) for p in self.preds_b])
        return float(b - a)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Rows of a resample: the test patients drawn with replacement within their class."""
        drawn = [i for members in self.strata.values() for i in rng.choice(members, len(members))]
        return np.concatenate([self.rows_of[i] for i in drawn])


def pooled_bootstrap(folds: Sequence[tuple[Sequence[TestPredictions], Sequence[TestPredictions]]], score: str,
                     n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Difference:
    """B - A pooled over cross-validation folds: each fold's (runs of A, runs of B) on that fold's test set. A
    resample draws every fold's test patients anew (within their class) and averages the folds' differences, so
    the interval reflects the test patients of all folds; `fold_differences` shows how far the folds agree."""
    if not folds:
        raise ValueError("no folds to compare")
    test_sets = [_PairedTestSet(runs_a, runs_b, score) for runs_a, runs_b in folds]
    rng = np.random.default_rng(seed)
    resampled = [float(np.mean([t.difference(t.draw(rng)) for t in test_sets])) for _ in range(n_resamples)]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    per_fold = tuple(t.difference() for t in test_sets)
    return Difference(observed=float(np.mean(per_fold)), low=float(low), high=float(high),
                      n_patients=sum(len(t.patients) for t in test_sets), n_resamples=n_resamples,
                      fold_differences=per_fold if len(per_fold) > 1 else ())


def paired_bootstrap(runs_a: Sequence[TestPredictions], runs_b: Sequence[TestPredictions], score: str,
                     n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Difference:
    """Difference mean-over-seeds score(B) - score(A) on one test set, resampling test patients (see the module
    docstring)."""
    return pooled_bootstrap([(runs_a, runs_b)], score, n_resamples, seed, level)


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
    runs: dict[tuple[str, str, float], dict[int | None, list[Path]]] = {}  # (label, mode, fraction) -> fold -> runs
    for record in records:
        key = (labeller(record.grid), str(record.grid["finetune_mode"]), float(record.grid["fraction"]))
        runs.setdefault(key, {}).setdefault(record.grid.get("fold"), []).append(record.out_dir / PREDICTIONS_FILE)
    if mode_a or mode_b:
        mode_pairs = [(mode_a or mode_b, mode_b or mode_a)]
    else:
        mode_pairs = [(mode, mode) for mode in sorted({m for (_, m, _) in runs})]
    comparisons = []
    for mode_pair in mode_pairs:
        for fraction in sorted({f for (_, _, f) in runs}):
            folds_a = runs.get((label_a, mode_pair[0], fraction), {})
            folds_b = runs.get((label_b, mode_pair[1], fraction), {})
            shared = sorted(set(folds_a) & set(folds_b), key=lambda f: -1 if f is None else f)
            if not shared:
                continue
            if set(folds_a) != set(folds_b):
                logger.warning("%s vs %s at fraction %s: folds %s and %s differ; compared on the shared folds %s",
                               side_a, side_b, fraction, sorted(folds_a, key=str), sorted(folds_b, key=str), shared)
            frames = [([read_test_predictions(p) for p in sorted(folds_a[f])],
                       [read_test_predictions(p) for p in sorted(folds_b[f])]) for f in shared]
            at_level = {section: [([to_level(r) for r in a], [to_level(r) for r in b]) for a, b in frames]
                        for section, to_level in levels.items() if any(m.startswith(section + ".") for m in wanted)}
            for metric in wanted:
                section, score = metric.split(".", 1)
                difference = pooled_bootstrap(at_level[section], score, n_resamples)
                comparisons.append(Comparison(label_a, label_b, *mode_pair, fraction, metric, difference,
                                              sum(len(folds_a[f]) for f in shared),
                                              sum(len(folds_b[f]) for f in shared)))
    return comparisons


def _format_difference(d: Difference) -> str:
    text = f"{100 * d.observed:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"
    if d.fold_differences:
        text += f" ±{100 * d.fold_spread:.1f}" + ("†" if d.within_fold_spread else "")
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
        first = group[0].difference
        if first.fold_differences:
            legend = (f"Percent points: difference of the seed means, averaged over {len(first.fold_differences)} "
                      f"cross-validation folds [95% paired bootstrap interval, every fold's test patients resampled "
                      f"within their class: {first.n_patients} patients in all, {first.n_resamples} resamples] "
                      "±std of the difference over folds; bold where the interval excludes 0; † where the "
                      "difference is smaller than its fold spread (the folds disagree).")
        else:
            legend = (f"Percent points: difference of the seed means on the test set [95% paired bootstrap interval, "
                      f"test patients resampled within their class: {first.n_patients} patients, "
                      f"{first.n_resamples} resamples]; bold where the interval excludes 0.")
        lines = [f"## {title}", "", legend, "",
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
                         "n_patients", "n_runs_a", "n_runs_b", "n_folds", "fold_spread"])
        for c in comparisons:
            d = c.difference
            spread = "" if not d.fold_differences else repr(d.fold_spread)
            writer.writerow([c.label_a, c.label_b, c.mode_a, c.mode_b, repr(c.fraction), c.metric,
                             repr(d.observed), repr(d.low), repr(d.high), d.n_patients, c.n_runs_a, c.n_runs_b,
                             len(d.fold_differences) or 1, spread])
