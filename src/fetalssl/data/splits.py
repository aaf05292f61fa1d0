"""Labelled-image manifests and how they are split: by patient, stratified by label, nested label fractions.

A manifest is a list of `LabelledImage` rows read from a CSV (`image_path,label,patient_id[,split]`, paths
relative to the CSV's folder) or scanned from class folders (`<root>/<label>/<file>`). Every problem found
while reading is collected and raised at once as a `ManifestError` that names the file and row, before any
training starts: nothing is silently dropped.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("image_path", "label", "patient_id")
LABELS_CSV = "labels.csv"  # looked for inside a dataset folder given as the source
# How many individual problems an error message lists before summarising the rest.
MAX_LISTED_PROBLEMS = 20


class ManifestError(ValueError):
    """The labelled data cannot be used as given; the message names every offending file/row."""


@dataclass(frozen=True)
class LabelledImage:
    path: Path  # absolute, used to load the image
    image_path: str  # as written in the manifest (relative), used in predictions.csv / train_subset.csv
    label: str
    patient_id: str
    split: str | None  # given split, None when the split is to be made here
    source: str  # "<file>, row <n>" or the file itself: where an error should point


def _raise_if_problems(problems: list[str], what: str) -> None:
    if not problems:
        return
    listed = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(listed)
    tail = f"\n  ... and {more} more" if more else ""
    raise ManifestError(f"{what}: {len(problems)} problem(s)\n  " + "\n  ".join(listed) + tail)


def read_csv_manifest(csv_path: str | Path, classes: Sequence[str]) -> list[LabelledImage]:
    """Rows of a labels CSV; row numbers in errors are the CSV line numbers (header = line 1).

    Each image may be listed once: a repeat (even with the same label) could leak into two splits.
    """
    csv_path = Path(csv_path)
    root = csv_path.parent
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ManifestError(f"{csv_path}: missing column(s) {missing}; found {columns}, "
                                f"need {list(REQUIRED_COLUMNS)} (+ optional 'split')")
        has_split = "split" in columns
        rows, problems = [], []
        first_seen: dict[str, str] = {}
        for row in reader:
            where = f"{csv_path}, row {reader.line_num}"  # the file's line number, blank lines included
            values = {c: (row.get(c) or "").strip() for c in (*REQUIRED_COLUMNS, "split")}
            empty = [c for c in REQUIRED_COLUMNS if not values[c]]
            if empty:
                problems.append(f"{where}: empty {empty}")
                continue
            split = values["split"] if has_split else None
            if has_split and split not in SPLITS:
                problems.append(f"{where}: split {split!r} is not one of {list(SPLITS)}")
            if values["label"] not in classes:
                problems.append(f"{where}: label {values['label']!r} is not in classes {list(classes)}")
            duplicate_of = first_seen.setdefault(values["image_path"], where)
            if duplicate_of != where:
                problems.append(f"{where}: image {values['image_path']!r} is already listed ({duplicate_of})")
            path = root / values["image_path"]
            if not path.is_file():
                problems.append(f"{where}: image file {path} does not exist")
            rows.append(LabelledImage(path=path, image_path=values["image_path"], label=values["label"],
                                      patient_id=values["patient_id"], split=split, source=where))
    _raise_if_problems(problems, str(csv_path))
    if not rows:
        raise ManifestError(f"{csv_path}: no rows")
    return rows


def scan_class_folders(root: str | Path, classes: Sequence[str], patient_pattern: str,
                       image_extensions: Sequence[str]) -> list[LabelledImage]:
    """`<root>/<label>/<file>`; the patient id is the first group of `patient_pattern` matched on the file name."""
    root = Path(root)
    pattern = re.compile(patient_pattern)
    extensions = {e.lower() for e in image_extensions}
    rows, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in classes:
            problems.append(f"{folder}: folder name {folder.name!r} is not in classes {list(classes)}")
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_dir():
                continue
            if path.suffix.lower() not in extensions:
                log.warning("Skipping %s: extension not in %s", path, sorted(extensions))
                continue
            match = pattern.search(path.name)
            if match is None or not match.groups() or not match.group(1):
                problems.append(f"{path}: file name does not match patient_pattern {patient_pattern!r}")
                continue
            rows.append(LabelledImage(path=path, image_path=str(path.relative_to(root)), label=folder.name,
                                      patient_id=match.group(1), split=None, source=str(path)))
    _raise_if_problems(problems, str(root))
    if not rows:
        raise ManifestError(f"{root}: no images found in class folders {list(classes)}")
    return rows


def read_manifest(source: str | Path, classes: Sequence[str], patient_pattern: str,
                  image_extensions: Sequence[str]) -> list[LabelledImage]:
    source = Path(source)
    if (source / LABELS_CSV).is_file():  # a dataset folder such as fetalssl-demo-data's output
        source = source / LABELS_CSV
    if source.is_file():
        return read_csv_manifest(source, classes)
    if source.is_dir():
        return scan_class_folders(source, classes, patient_pattern, image_extensions)
    raise ManifestError(f"{source}: neither a labels CSV nor a class-folder directory")


def check_given_splits(rows: Sequence[LabelledImage]) -> None:
    """A manifest gives splits for all rows or for none, and a patient never spans two splits."""
    given = [r.split is not None for r in rows]
    if any(given) and not all(given):
        raise ManifestError(f"{rows[given.index(False)].source}: some rows have a split and this one has none")
    first_split: dict[str, LabelledImage] = {}
    problems = []
    for r in rows:
        seen = first_split.setdefault(r.patient_id, r)
        if seen.split != r.split:
            problems.append(f"{r.source}: patient {r.patient_id!r} is in split {r.split!r} "
                            f"but also in {seen.split!r} ({seen.source})")
    _raise_if_problems(problems, "given splits mix patients")


def check_classes_present(rows: Sequence[LabelledImage], classes: Sequence[str]) -> None:
    """Every class in every split: a missing class would make metrics and class weights meaningless."""
    counts = Counter((r.split, r.label) for r in rows)
    problems = [f"split {split!r} has no image of class {c!r}" for split in SPLITS for c in classes
                if counts[(split, c)] == 0]
    _raise_if_problems(problems, "empty classes (fewer patients than splits need? lower val/test fractions "
                                 "or give a split column)")


def grouped_split(labels: Sequence[int], groups: Sequence[str], val_fraction: float, test_fraction: float,
                  seed: int) -> np.ndarray:
    """Assign every item to train/val/test so no group (patient) spans splits and label shares follow the fractions.

    Greedy, like sklearn's StratifiedGroupKFold but for arbitrary fractions. The cost of a split is its squared
    per-class shortfall relative to its target, so small val/test splits weigh as much as train.
    1. Coverage: for each class, rarest first, every split still lacking it takes the unassigned patient with
       that class that lowers the split's cost most (so every split can be evaluated on every class).
    2. Balance: the remaining patients, largest first, each join the split whose cost they lower most.
    Ties follow a seeded shuffle of the patients. Returns split names aligned with `labels`.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: need each in [0, 1) "
                         "and a sum below 1")
    labels = np.asarray(labels)
    group_names, group_of_item = np.unique(np.asarray(groups), return_inverse=True)
    n_classes = int(labels.max()) + 1
    per_group = np.zeros((len(group_names), n_classes))
    np.add.at(per_group, (group_of_item, labels), 1)
    fractions = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    target = fractions[:, None] * per_group.sum(0)[None, :]
    scale = np.maximum(target, 1.0)
    current = np.zeros_like(target)
    split_of_group = np.full(len(group_names), -1)

    def cost_change(g: int, s: int) -> float:
        after = ((current[s] + per_group[g] - target[s]) / scale[s]) ** 2
        before = ((current[s] - target[s]) / scale[s]) ** 2
        return float((after - before).sum())

    def assign(g: int, s: int) -> None:
        split_of_group[g] = s
        current[s] += per_group[g]

    order = np.random.default_rng(seed).permutation(len(group_names))
    active_splits = [s for s in np.argsort(fractions, kind="stable") if fractions[s] > 0]
    for c in np.argsort((per_group > 0).sum(0), kind="stable"):
        for s in active_splits:
            candidates = [g for g in order if split_of_group[g] < 0 and per_group[g, c] > 0]
            if current[s, c] == 0 and candidates:
                assign(min(candidates, key=lambda g: cost_change(g, s)), s)
    for g in order[np.argsort(-per_group[order].sum(1), kind="stable")]:
        if split_of_group[g] < 0:
            assign(g, min(active_splits, key=lambda s: cost_change(g, s)))
    return np.array(SPLITS)[split_of_group[group_of_item]]


def nested_fraction(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified subset holding `fraction` of each class (at least one image per class).

    Each class gets one seeded permutation that does not depend on `fraction`, and the subset takes its first
    round(fraction * n_c) items, so subsets for growing fractions with the same seed are nested.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    labels = np.asarray(labels)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        permuted = members[np.random.default_rng([seed, int(c)]).permutation(len(members))]
        # Half-up rounding (not Python's banker's round()) so the rule is easy to state and check.
        k = max(1, min(len(members), math.floor(fraction * len(members) + 0.5)))
        chosen.append(permuted[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=int)
