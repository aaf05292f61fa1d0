"""Patient-grouped splits, nested label fractions and manifest validation (fetalssl.data.splits)."""

import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetalssl.data.splits import (
    ManifestError,
    check_classes_present,
    check_images,
    grouped_split,
    infer_classes,
    nested_fraction,
    read_csv_manifest,
    read_manifest,
    scan_class_folders,
)

CLASSES = ["4CH", "LVOT", "RVOT", "3VV", "3VT"]
N_CLASSES = len(CLASSES)
FAST = settings(max_examples=40, deadline=None)


@st.composite
def manifests(draw, pure_patients_per_class=0):
    """(labels, patient ids): random patients with 0-4 images per class, plus optional single-class patients."""
    n_patients = draw(st.integers(1, 25))
    counts = draw(st.lists(st.lists(st.integers(0, 4), min_size=N_CLASSES, max_size=N_CLASSES),
                           min_size=n_patients, max_size=n_patients))
    labels, groups = [], []
    for p, per_class in enumerate(counts):
        for c, n in enumerate(per_class):
            labels += [c] * n
            groups += [f"p{p}"] * n
    for c in range(N_CLASSES):
        for k in range(pure_patients_per_class):
            n = draw(st.integers(1, 3))
            labels += [c] * n
            groups += [f"pure{c}_{k}"] * n
    if not labels:
        labels, groups = [0], ["p0"]
    return np.array(labels), np.array(groups)


fractions = st.floats(0.05, 0.3)
seeds = st.integers(0, 2**31 - 1)


# ---- grouped_split --------------------------------------------------------------------------------------
@FAST
@given(manifests(), fractions, fractions, seeds)
def test_no_patient_in_two_splits_and_same_seed_same_split(manifest, val, test, seed):
    labels, groups = manifest
    split = grouped_split(labels, groups, val, test, seed)
    assert split.shape == labels.shape
    assert set(split) <= {"train", "val", "test"}
    for patient in np.unique(groups):
        assert len(set(split[groups == patient])) == 1, patient
    np.testing.assert_array_equal(split, grouped_split(labels, groups, val, test, seed))


@FAST
@given(manifests(pure_patients_per_class=3), fractions, fractions, seeds)
def test_every_class_in_every_split_when_three_patients_per_class_allow_it(manifest, val, test, seed):
    labels, groups = manifest
    split = grouped_split(labels, groups, val, test, seed)
    for name in ("train", "val", "test"):
        assert set(labels[split == name]) == set(range(N_CLASSES)), name


def test_split_sizes_follow_fractions_on_many_patients():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, N_CLASSES, 3000)
    groups = np.array([f"p{i // 10}" for i in range(3000)])  # 300 patients of 10 images
    split = grouped_split(labels, groups, 0.15, 0.2, seed=3)
    assert abs((split == "val").mean() - 0.15) < 0.02
    assert abs((split == "test").mean() - 0.2) < 0.02
    for c in range(N_CLASSES):  # stratified: each class is split in about the same proportions
        assert abs((split[labels == c] == "test").mean() - 0.2) < 0.03


def test_split_rejects_impossible_fractions():
    with pytest.raises(ValueError, match="val_fraction"):
        grouped_split([0, 1], ["a", "b"], 0.6, 0.5, seed=0)


# ---- nested_fraction ------------------------------------------------------------------------------------
@FAST
@given(manifests(), st.lists(st.floats(0.001, 1.0), min_size=2, max_size=4), seeds)
def test_fractions_nested_stratified_and_at_least_one_per_class(manifest, fraction_list, seed):
    labels, _ = manifest
    subsets = [set(nested_fraction(labels, f, seed)) for f in sorted(fraction_list)]
    for smaller, larger in zip(subsets, subsets[1:], strict=False):
        assert smaller <= larger
    for f, subset in zip(sorted(fraction_list), subsets, strict=True):
        chosen = labels[sorted(subset)]
        for c in np.unique(labels):
            n_c, k_c = (labels == c).sum(), (chosen == c).sum()
            assert k_c >= 1
            assert abs(k_c - f * n_c) < 1 or k_c == 1  # within one image of the exact share
        assert set(chosen) == set(labels)
    assert set(nested_fraction(labels, 1.0, seed)) == set(range(len(labels)))


@FAST
@given(manifests(), st.floats(0.001, 1.0), seeds)
def test_fraction_identical_for_same_seed(manifest, fraction, seed):
    labels, _ = manifest
    np.testing.assert_array_equal(nested_fraction(labels, fraction, seed), nested_fraction(labels, fraction, seed))


@FAST
@given(st.integers(40, 80), st.floats(0.2, 0.8), seeds, seeds)
def test_fraction_differs_for_another_seed(n_per_class, fraction, seed, other):
    if seed == other:
        other = seed + 1
    labels = np.repeat(np.arange(N_CLASSES), n_per_class)
    # >= 8 of >= 40 images per class: two seeds pick the same subset with probability < 1e-7.
    assert not np.array_equal(nested_fraction(labels, fraction, seed), nested_fraction(labels, fraction, other))


def test_fraction_rounds_half_up_and_keeps_one_per_class():
    labels = np.array([0] * 10 + [1] * 3)
    chosen = labels[nested_fraction(labels, 0.25, seed=0)]
    assert (chosen == 0).sum() == 3  # 2.5 -> 3
    assert (chosen == 1).sum() == 1  # 0.75 -> 1
    chosen = labels[nested_fraction(labels, 0.01, seed=0)]
    assert list(np.bincount(chosen)) == [1, 1]
    with pytest.raises(ValueError, match="fraction"):
        nested_fraction(labels, 0.0, seed=0)


# ---- manifest reading and bad input ---------------------------------------------------------------------
def _write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8), 128, np.uint8))


def _write_csv(tmp_path, lines, make_files=True):
    for line in lines[1:]:
        image = line.split(",")[0]
        if make_files and image:
            _write_image(tmp_path / image)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


def test_csv_manifest_paths_relative_to_csv_folder(tmp_path):
    csv_path = _write_csv(tmp_path, ["image_path,label,patient_id", "f/4CH/a_1.png,4CH,a", "f/3VT/b_1.png,3VT,b"])
    rows = read_manifest(csv_path, CLASSES, "pattern", r"^([^_]+)_", [".png"])
    assert [(r.path, r.image_path, r.label, r.patient_id, r.split) for r in rows] == [
        (tmp_path / "f/4CH/a_1.png", "f/4CH/a_1.png", "4CH", "a", None),
        (tmp_path / "f/3VT/b_1.png", "f/3VT/b_1.png", "3VT", "b", None),
    ]


def test_missing_column_is_named(tmp_path):
    csv_path = _write_csv(tmp_path, ["image_path,label", "a_1.png,4CH"])
    with pytest.raises(ManifestError, match=r"labels.csv: missing column\(s\) \['patient_id'\]"):
        read_csv_manifest(csv_path, CLASSES)


def test_missing_file_names_row(tmp_path):
    csv_path = _write_csv(tmp_path, ["image_path,label,patient_id", "a_1.png,4CH,a", "gone.png,LVOT,b"])
    (tmp_path / "gone.png").unlink()
    with pytest.raises(ManifestError, match=r"labels.csv, row 3: image file .*gone.png does not exist"):
        read_csv_manifest(csv_path, CLASSES)


def test_unknown_label_names_row(tmp_path):
    csv_path = _write_csv(tmp_path, ["image_path,label,patient_id", "a_1.png,4CH,a", "b_1.png,abdomen,b"])
    with pytest.raises(ManifestError, match=r"row 3: label 'abdomen' is not in data.classes"):
        read_csv_manifest(csv_path, CLASSES)


def test_bad_split_and_empty_cells_name_rows_all_at_once(tmp_path):
    csv_path = _write_csv(tmp_path, ["image_path,label,patient_id,split", "a_1.png,4CH,a,train",
                                     "b_1.png,4CH,b,holdout", "c_1.png,4CH,,test"])
    with pytest.raises(ManifestError, match=r"2 problem") as err:
        read_csv_manifest(csv_path, CLASSES)
    assert "row 3: split 'holdout'" in str(err.value)
    assert "row 4: empty ['patient_id']" in str(err.value)


def test_duplicate_image_and_blank_lines_name_the_right_rows(tmp_path):
    csv_path = _write_csv(tmp_path, ["image_path,label,patient_id", "a_1.png,4CH,a", "", "a_1.png,LVOT,a"])
    with pytest.raises(ManifestError, match=r"row 4: image 'a_1.png' is already listed \(.*row 2\)"):
        read_csv_manifest(csv_path, CLASSES)


def test_class_left_empty_in_a_split_is_named():
    from fetalssl.data.splits import LabelledImage

    rows = [LabelledImage(None, f"{s}{c}.png", c, s, s, "x") for s in ("train", "val", "test") for c in CLASSES]
    rows = [r for r in rows if not (r.split == "val" and r.label == "RVOT")]
    with pytest.raises(ManifestError, match="split 'val' has no image of class 'RVOT'"):
        check_classes_present(rows, CLASSES)


def test_class_folders_patient_pattern_and_errors(tmp_path):
    _write_image(tmp_path / "4CH" / "p01_3.png")
    _write_image(tmp_path / "3VT" / "p02_x_7.png")
    (tmp_path / "3VT" / "notes.txt").write_text("skipped with a warning")
    rows = scan_class_folders(tmp_path, ["4CH", "3VT"], "pattern", r"^([^_]+)_", [".png"])
    assert sorted((r.image_path, r.label, r.patient_id) for r in rows) == [
        ("3VT/p02_x_7.png", "3VT", "p02"), ("4CH/p01_3.png", "4CH", "p01")]
    rows = scan_class_folders(tmp_path, ["4CH", "3VT"], "pattern", r"_(\d+)\.png$", [".png"])
    assert sorted(r.patient_id for r in rows) == ["3", "7"]

    _write_image(tmp_path / "abdomen" / "p03_1.png")
    _write_image(tmp_path / "LVOT" / "nounderscore.png")
    with pytest.raises(ManifestError) as err:
        scan_class_folders(tmp_path, ["4CH", "3VT", "LVOT"], "pattern", r"^([^_]+)_", [".png"])
    assert "folder 'abdomen' is not in data.classes" in str(err.value)
    assert "1 of 3 images have no patient id by data.patient_pattern" in str(err.value)
    assert "'nounderscore.png'" in str(err.value) and "folder or none" in str(err.value)


def test_class_folders_give_the_classes_when_none_are_set(tmp_path, caplog):
    for label in ("small", "large", "medium"):  # a fetal-head dataset, not cardiac planes
        _write_image(tmp_path / label / f"p1_{label}.png")
    with caplog.at_level("INFO"):
        rows = scan_class_folders(tmp_path, None, "pattern", r"^([^_]+)_", [".png"])
        assert infer_classes(rows, tmp_path) == ["large", "medium", "small"]  # stable: sorted
    assert "using the 3 labels found" in caplog.text
    with pytest.raises(ManifestError) as err:  # a given list keeps its order and names what does not match
        scan_class_folders(tmp_path, ["small", "large", "tiny"], "pattern", r"^([^_]+)_", [".png"])
    assert "folder 'medium' is not in data.classes" in str(err.value) and "no folder for class 'tiny'" in str(err.value)


def test_patient_id_choices_for_names_without_one(tmp_path, caplog):
    for i in range(1, 4):
        _write_image(tmp_path / "benign" / f"benign ({i}).png")
    _write_image(tmp_path / "malignant" / "malignant (1).png")
    with pytest.raises(ManifestError) as err:  # one summary line with the choices, not a line per file
        scan_class_folders(tmp_path, None, "pattern", r"^([^_]+)_", [".png"])
    assert "4 of 4 images have no patient id" in str(err.value) and "1 problem(s)" in str(err.value)
    with caplog.at_level("WARNING"):
        rows = scan_class_folders(tmp_path, None, "none", r"^([^_]+)_", [".png"])
    assert len({r.patient_id for r in rows}) == 4 and "may land in different splits" in caplog.text
    assert {r.patient_id for r in scan_class_folders(tmp_path, None, "pattern", None, [".png"])} == {
        r.patient_id for r in rows}  # patient_pattern: null is "none"
    _write_image(tmp_path / "normal" / "p7" / "a.png")
    _write_image(tmp_path / "normal" / "p7" / "b.png")
    _write_image(tmp_path / "normal" / "p8" / "a.png")
    by_folder = scan_class_folders(_only(tmp_path, "normal"), None, "folder", None, [".png"])
    assert sorted(r.patient_id for r in by_folder) == ["p7", "p7", "p8"]


def _only(root, label):
    """A copy of one class folder under a fresh root (scan_class_folders reads every folder of its root)."""
    import shutil

    new = root.parent / f"{root.name}_{label}"
    shutil.copytree(root / label, new / label)
    return new


def test_every_image_is_decoded_before_training_and_bad_ones_named_with_their_row(tmp_path):
    _write_image(tmp_path / "f" / "good.png")
    (tmp_path / "f").mkdir(exist_ok=True)
    (tmp_path / "f" / "text.png").write_text("not an image")
    cv2.imwrite(str(tmp_path / "f" / "tiny.png"), np.zeros((4, 40), np.uint8))
    csv_path = _write_csv(tmp_path, ["image_path,label,patient_id", "f/good.png,4CH,a", "f/text.png,4CH,b",
                                     "f/tiny.png,3VT,c"], make_files=False)
    rows = read_csv_manifest(csv_path, CLASSES)
    with pytest.raises(ManifestError) as err:
        check_images(rows, min_side=8)
    message = str(err.value)
    assert f"{csv_path}, row 3: {tmp_path / 'f' / 'text.png'} cannot be decoded" in message
    assert f"{csv_path}, row 4" in message and "40x4 px, smaller than data.min_image_side=8" in message
    assert "row 2" not in message
    check_images(rows[:1], min_side=8)


def test_nonexistent_source(tmp_path):
    with pytest.raises(ManifestError, match="neither a labels CSV"):
        read_manifest(tmp_path / "nope", CLASSES, "pattern", r"^([^_]+)_", [".png"])


def test_many_problems_are_summarised(tmp_path):
    lines = ["image_path,label,patient_id"] + [f"x{i}.png,bad,p{i}" for i in range(30)]
    csv_path = _write_csv(tmp_path, lines)
    with pytest.raises(ManifestError, match=r"30 problem\(s\)(.|\n)*and 10 more"):
        read_csv_manifest(csv_path, CLASSES)


def test_fraction_rule_matches_math():
    labels = np.repeat(np.arange(3), [7, 50, 200])
    for f in (0.01, 0.05, 0.1, 0.25, 0.5):
        counts = np.bincount(labels[nested_fraction(labels, f, seed=1)])
        assert list(counts) == [max(1, math.floor(f * n + 0.5)) for n in (7, 50, 200)]
