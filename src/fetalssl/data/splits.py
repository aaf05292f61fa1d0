"""Labelled-image manifests and how they are split: by patient, stratified by label, nested label fractions.

A manifest is a list of `LabelledImage` rows read from a CSV (`image_path,label,patient_id[,split][,fold]`, paths
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

import cv2
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
    fold: int | None = None  # given cross-validation fold (a `fold` column), None when folds are made here


def _raise_if_problems(problems: list[str], what: str) -> None:
    if not problems:
        return
    listed = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(listed)
    tail = f"\n  ... and {more} more" if more else ""
    raise ManifestError(f"{what}: {len(problems)} problem(s)\n  " + "\n  ".join(listed) + tail)


def read_csv_manifest(csv_path: str | Path, classes: Sequence[str] | None) -> list[LabelledImage]:
    """Rows of a labels CSV; row numbers in errors are the CSV line numbers (header = line 1).

    Each image may be listed once: a repeat (even with the same label) could leak into two splits. With
    ``classes`` None every label is accepted (the class list is then inferred, see `infer_classes`).
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
        has_fold = "fold" in columns
        rows, problems = [], []
        first_seen: dict[str, str] = {}
        for row in reader:
            where = f"{csv_path}, row {reader.line_num}"  # the file's line number, blank lines included
            values = {c: (row.get(c) or "").strip() for c in (*REQUIRED_COLUMNS, "split", "fold")}
            empty = [c for c in REQUIRED_COLUMNS if not values[c]]
            if empty:
                problems.append(f"{where}: empty {empty}")
                continue
            split = values["split"] if has_split else None
            if has_split and split not in SPLITS:
                problems.append(f"{where}: split {split!r} is not one of {list(SPLITS)}")
            fold = int(values["fold"]) if has_fold and values["fold"].isdigit() else None
            if has_fold and fold is None:
                problems.append(f"{where}: fold {values['fold']!r} is not a non-negative integer")
            if classes is not None and values["label"] not in classes:
                problems.append(f"{where}: label {values['label']!r} is not in data.classes {list(classes)}")
            duplicate_of = first_seen.setdefault(values["image_path"], where)
            if duplicate_of != where:
                problems.append(f"{where}: image {values['image_path']!r} is already listed ({duplicate_of})")
            path = root / values["image_path"]
            if not path.is_file():
                problems.append(f"{where}: image file {path} does not exist")
            rows.append(LabelledImage(path=path, image_path=values["image_path"], label=values["label"],
                                      patient_id=values["patient_id"], split=split, source=where, fold=fold))
    _raise_if_problems(problems, str(csv_path))
    if not rows:
        raise ManifestError(f"{csv_path}: no rows")
    return rows


PATIENT_ID_CHOICES = ("pattern", "folder", "none")


def _patient_of(path: Path, class_dir: Path, patient_id: str, pattern: re.Pattern | None) -> str | None:
    """The patient (group) of an image in a class folder, or None when the rule finds none for it."""
    if patient_id == "folder":
        relative = path.relative_to(class_dir)
        return relative.parts[0] if len(relative.parts) > 1 else None
    if patient_id == "none" or pattern is None:
        return str(path.relative_to(class_dir.parent))  # every image its own group
    match = pattern.search(path.name)
    return match.group(1) if match is not None and match.groups() and match.group(1) else None


def scan_class_folders(root: str | Path, classes: Sequence[str] | None, patient_id: str,
                       patient_pattern: str | None, image_extensions: Sequence[str]) -> list[LabelledImage]:
    """`<root>/<label>/...<file>`. ``classes`` None: every sub-folder is a class. The patient (the group no split
    divides) of each image, by ``patient_id``:
    - "pattern": the first group of the regex ``patient_pattern`` matched on the file name (null: as "none");
    - "folder": the sub-folder below the class folder (`<root>/<label>/<patient>/<file>`);
    - "none": every image is its own group (a warning says that one patient's images may then straddle splits).
    """
    root = Path(root)
    if patient_id not in PATIENT_ID_CHOICES:
        raise ManifestError(f"data.patient_id={patient_id!r}: must be one of {list(PATIENT_ID_CHOICES)}")
    pattern = re.compile(patient_pattern) if patient_pattern is not None else None
    if patient_id == "none" or (patient_id == "pattern" and pattern is None):
        log.warning("%s: no patient ids (data.patient_id=none): every image is its own group, so images of one "
                    "patient may land in different splits and the test score may be optimistic", root)
    extensions = {e.lower() for e in image_extensions}
    rows, problems, unmatched = [], [], []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None:
        problems += [f"{f}: folder {f.name!r} is not in data.classes {list(classes)} (leave data.classes unset to "
                     f"use every folder as a class)" for f in folders if f.name not in classes]
        problems += [f"{root}: no folder for class {c!r} of data.classes" for c in classes
                     if c not in {f.name for f in folders}]
    for folder in folders:
        if classes is not None and folder.name not in classes:
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_dir():
                continue
            if path.suffix.lower() not in extensions:
                log.warning("Skipping %s: extension not in %s", path, sorted(extensions))
                continue
            patient = _patient_of(path, folder, patient_id, pattern)
            if patient is None:
                unmatched.append(path)
                continue
            rows.append(LabelledImage(path=path, image_path=str(path.relative_to(root)), label=folder.name,
                                      patient_id=patient, split=None, source=str(path)))
    if unmatched:
        rule = (f"data.patient_pattern {patient_pattern!r} (its first group is the patient id)"
                if patient_id == "pattern" else "data.patient_id=folder (<label>/<patient>/<file>)")
        examples = ", ".join(repr(p.name) for p in unmatched[:3])
        problems.append(f"{len(unmatched)} of {len(unmatched) + len(rows)} images have no patient id by {rule}, "
                        f"e.g. {examples}. Choose data.patient_id=pattern (with a data.patient_pattern that "
                        "matches, quoted for the shell and Hydra: 'data.patient_pattern=\"^(.+)_[0-9]+\"'), "
                        "folder or none")
    _raise_if_problems(problems, str(root))
    if not rows:
        raise ManifestError(f"{root}: no images with extensions {sorted(extensions)} in class folders")
    return rows


def infer_classes(rows: Sequence[LabelledImage], source: str | Path) -> list[str]:
    """The class list when data.classes is not given: every label found, sorted (a stable order)."""
    classes = sorted({r.label for r in rows})
    log.info("%s: data.classes not given; using the %d labels found, in this order: %s", source, len(classes),
             classes)
    return classes


def read_manifest(source: str | Path, classes: Sequence[str] | None, patient_id: str, patient_pattern: str | None,
                  image_extensions: Sequence[str]) -> list[LabelledImage]:
    source = Path(source)
    if (source / LABELS_CSV).is_file():  # a dataset folder such as fetalssl-demo-data's output
        source = source / LABELS_CSV
    if source.is_file():
        return read_csv_manifest(source, classes)
    if source.is_dir():
        return scan_class_folders(source, classes, patient_id, patient_pattern, image_extensions)
    raise ManifestError(f"{source}: neither a labels CSV nor a class-folder directory")


def check_images(rows: Sequence[LabelledImage], min_side: int) -> None:
    """Decode every image once, before training: an unreadable file, a too small image or an unusual channel
    count is named with its row here rather than failing in a loader worker (or after training, in test)."""
    problems = []
    for r in rows:
        image = cv2.imread(str(r.path), cv2.IMREAD_UNCHANGED)
        if image is None:
            problems.append(f"{r.source}: {r.path} cannot be decoded as an image")
        elif min(image.shape[:2]) < min_side:
            problems.append(f"{r.source}: {r.path} is {image.shape[1]}x{image.shape[0]} px, smaller than "
                            f"data.min_image_side={min_side}")
        elif image.ndim == 3 and image.shape[2] not in (1, 3, 4):
            problems.append(f"{r.source}: {r.path} has {image.shape[2]} channels (expected 1, 3 or 4)")
    _raise_if_problems(problems, "unusable images")


def check_given_splits(rows: Sequence[LabelledImage], attribute: str = "split") -> None:
    """A manifest gives splits (or folds) for all rows or for none, and a patient never spans two of them."""
    given = [getattr(r, attribute) is not None for r in rows]
    if any(given) and not all(given):
        raise ManifestError(f"{rows[given.index(False)].source}: some rows have a {attribute} and this one has none")
    first_seen: dict[str, LabelledImage] = {}
    problems = []
    for r in rows:
        seen = first_seen.setdefault(r.patient_id, r)
        if getattr(seen, attribute) != getattr(r, attribute):
            problems.append(f"{r.source}: patient {r.patient_id!r} is in {attribute} {getattr(r, attribute)!r} "
                            f"but also in {getattr(seen, attribute)!r} ({seen.source})")
    _raise_if_problems(problems, f"given {attribute}s mix patients")


def check_classes_present(rows: Sequence[LabelledImage], classes: Sequence[str]) -> None:
    """Every class in every split: a missing class would make metrics and class weights meaningless."""
    counts = Counter((r.split, r.label) for r in rows)
    problems = [f"split {split!r} has no image of class {c!r}" for split in SPLITS for c in classes
                if counts[(split, c)] == 0]
    _raise_if_problems(problems, "empty classes (fewer patients than splits need? lower val/test fractions "
                                 "or give a split column)")


def grouped_split(labels: Sequence[int], groups: Sequence[str], val_fraction: float, test_fraction: float,
                  seed: int) -> np.ndarray:
    """Assign every item to train/val/test so no group (patient) spans splits and label shares follow the
    fractions (see `grouped_parts`). Returns split names aligned with `labels`."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: need each in [0, 1) "
                         "and a sum below 1")
    fractions = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    return np.array(SPLITS)[grouped_parts(labels, groups, fractions, seed)]


def grouped_folds(labels: Sequence[int], groups: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """Fold (0..folds-1) of every item: patient-grouped, label-stratified, equal shares (see `grouped_parts`)."""
    if folds < 3:
        raise ValueError(f"data.folds={folds}: need at least 3 folds (one tests, the next validates, the rest train)")
    n_groups = len(set(groups))
    if n_groups < folds:
        raise ValueError(f"data.folds={folds}: only {n_groups} patients, fewer than the folds")
    return grouped_parts(labels, groups, np.full(folds, 1.0 / folds), seed)


def fold_splits(fold_of_item: Sequence[int], fold: int, folds: int) -> np.ndarray:
    """Cross-validation round `fold`: its fold is test, the next one (cyclically) val, the others train."""
    if folds < 3 or not 0 <= fold < folds:
        raise ValueError(f"data.fold={fold}, data.folds={folds}: need folds >= 3 and fold in [0, folds)")
    fold_of_item = np.asarray(fold_of_item)
    split = np.full(len(fold_of_item), "train", dtype=object)
    split[fold_of_item == fold] = "test"
    split[fold_of_item == (fold + 1) % folds] = "val"
    return split.astype(str)


def grouped_parts(labels: Sequence[int], groups: Sequence[str], fractions: np.ndarray, seed: int) -> np.ndarray:
    """Part index of every item so no group (patient) spans parts and label shares follow `fractions`.

    Greedy, like sklearn's StratifiedGroupKFold but for arbitrary fractions. The cost of a part is its squared
    per-class shortfall relative to its target, so small parts weigh as much as large ones.
    1. Coverage: for each class, rarest first, every part still lacking it takes the unassigned patient with
       that class that lowers the part's cost most (so every part can be evaluated on every class).
    2. Balance: the remaining patients, largest first, each join the part whose cost they lower most.
    Ties follow a seeded shuffle of the patients.
    """
    labels = np.asarray(labels)
    group_names, group_of_item = np.unique(np.asarray(groups), return_inverse=True)
    n_classes = int(labels.max()) + 1
    per_group = np.zeros((len(group_names), n_classes))
    np.add.at(per_group, (group_of_item, labels), 1)
    target = fractions[:, None] * per_group.sum(0)[None, :]
    scale = np.maximum(target, 1.0)
    current = np.zeros_like(target)
    part_of_group = np.full(len(group_names), -1)

    def cost_change(g: int, s: int) -> float:
        after = ((current[s] + per_group[g] - target[s]) / scale[s]) ** 2
        before = ((current[s] - target[s]) / scale[s]) ** 2
        return float((after - before).sum())

    def assign(g: int, s: int) -> None:
        part_of_group[g] = s
        current[s] += per_group[g]

    order = np.random.default_rng(seed).permutation(len(group_names))
    active_parts = [s for s in np.argsort(fractions, kind="stable") if fractions[s] > 0]
    for c in np.argsort((per_group > 0).sum(0), kind="stable"):
        for s in active_parts:
            candidates = [g for g in order if part_of_group[g] < 0 and per_group[g, c] > 0]
            if current[s, c] == 0 and candidates:
                assign(min(candidates, key=lambda g: cost_change(g, s)), s)
    for g in order[np.argsort(-per_group[order].sum(1), kind="stable")]:
        if part_of_group[g] < 0:
            assign(g, min(active_parts, key=lambda s: cost_change(g, s)))
    return part_of_group[group_of_item]


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
