"""DownstreamDataModule: batches, splits, nested subsets, class weights and input errors before training."""

import csv
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import data_groups, scan_options
from fetalssl.data.downstream import DownstreamDataModule
from fetalssl.data.splits import ManifestError

CONF = Path(__file__).resolve().parents[1] / "src" / "fetalssl" / "conf"
CLASSES = ["4CH", "LVOT", "RVOT", "3VV", "3VT"]
SIZE = 16


def make_images(root: Path, n_patients: int, per_class: int, split_of=None, value_of=None) -> Path:
    """frames/<label>/<patient>_<n>.png (40x48 grey) and labels.csv; returns the CSV path."""
    rows = []
    for p in range(n_patients):
        for label in CLASSES:
            for k in range(per_class):
                rel = f"frames/{label}/p{p}_{label}{k}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                value = value_of(p, label) if value_of else (37 * p + 11 * k) % 256
                cv2.imwrite(str(root / rel), np.full((40, 48), value, np.uint8))
                rows.append([rel, label, f"p{p}"] + ([split_of(p)] if split_of else []))
    csv_path = root / "labels.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "label", "patient_id"] + (["split"] if split_of else []))
        writer.writerows(rows)
    return csv_path


def eval_transform():
    return A.Compose([A.SmallestMaxSize(max_size=SIZE), A.CenterCrop(height=SIZE, width=SIZE)])


def datamodule(source, **overrides) -> DownstreamDataModule:
    kwargs = dict(root=source, classes=CLASSES, patient_id="pattern", patient_pattern=r"^([^_]+)_",
                  image_extensions=[".png"], min_image_side=16,
                  val_fraction=0.2, test_fraction=0.2, split_seed=0, folds=None, fold=None, fraction=1.0,
                  fraction_seed=0,
                  image_size=SIZE, channels=3, mean=0.5, std=0.25, scan=scan_options("keep"), pad_to_square=False,
                  train_transform=eval_transform(),
                  eval_transform=eval_transform(), batch_size=8, num_workers=0, seed=0)
    return DownstreamDataModule(**{**kwargs, **overrides})


def read_csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("channels", [1, 3])
def test_batches_are_normalised_replicated_grey_with_fixed_class_indices(tmp_path, channels):
    source = make_images(tmp_path, 10, 1, value_of=lambda p, label: 40 * CLASSES.index(label))
    dm = datamodule(source, channels=channels)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for x, y in loader:
            assert x.dtype == torch.float32 and y.dtype == torch.long
            assert x.shape[1:] == (channels, SIZE, SIZE)
            # image value 40 * class index -> (v / 255 - 0.5) / 0.25 in every channel and pixel
            expected = (40 * y.float() / 255 - 0.5) / 0.25
            torch.testing.assert_close(x, expected[:, None, None, None].expand_as(x))


def test_labelled_yaml_instantiates_with_albumentations(tmp_path):
    source = make_images(tmp_path, 10, 1)
    cfg = OmegaConf.create({**data_groups(), "seed": 3, "data": OmegaConf.load(CONF / "data" / "labelled.yaml")})
    cfg.data.root, cfg.data.image_size, cfg.data.num_workers = str(source), SIZE, 0
    dm = instantiate(cfg.data, output_dir=tmp_path / "run")
    assert isinstance(dm.train_transform, A.Compose) and isinstance(dm.eval_transform, A.Compose)
    assert dm.fraction_seed == 3 and (dm.mean, dm.std) == (0.5, 0.25)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, SIZE, SIZE) and y.dtype == torch.long
    assert (tmp_path / "run" / "train_subset.csv").is_file()


def test_given_splits_are_honoured(tmp_path):
    split_of = {0: "test", 1: "val"}.get
    source = make_images(tmp_path, 5, 2, split_of=lambda p: split_of(p, "train"))
    dm = datamodule(source)
    dm.setup()
    assert {r.patient_id for r in dm.rows("test")} == {"p0"}
    assert {r.patient_id for r in dm.rows("val")} == {"p1"}
    assert {r.patient_id for r in dm.rows("train")} == {"p2", "p3", "p4"}
    assert len(dm.rows("train")) == 3 * 5 * 2


def test_given_split_with_patient_in_two_splits_names_rows(tmp_path):
    source = make_images(tmp_path, 5, 1, split_of=lambda p: "train")
    lines = source.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",val"  # p0's third image moves to val
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"labels.csv, row \d+: patient 'p0' is in split 'val' but also in 'train'"):
        datamodule(source).setup()


def test_auto_split_groups_patients_and_subset_file_matches_training_rows(tmp_path):
    source = make_images(tmp_path, 12, 4)
    dm = datamodule(source, fraction=0.25, fraction_seed=5, output_dir=tmp_path / "run")
    dm.setup()
    patients = {s: {r.patient_id for r in dm.rows(s)} for s in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    saved = read_csv_rows(tmp_path / "run" / "train_subset.csv")
    assert [(r["image_path"], r["label"], r["patient_id"]) for r in saved] == [
        (r.image_path, r.label, r.patient_id) for r in dm.rows("train")]
    # every class: round(0.25 * n_c) of that class's training images
    full = datamodule(source)
    full.setup()
    n_full = full.class_counts()
    assert list(dm.class_counts()) == [max(1, int(np.floor(0.25 * n + 0.5))) for n in n_full]
    assert {r.image_path for r in dm.rows("train")} <= {r.image_path for r in full.rows("train")}
    assert [r.image_path for r in dm.rows("test")] == [r.image_path for r in full.rows("test")]


def test_split_and_subset_do_not_depend_on_csv_row_order(tmp_path):
    source = make_images(tmp_path, 12, 2)
    lines = source.read_text().splitlines()
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    a, b = datamodule(source, fraction=0.5), datamodule(shuffled, fraction=0.5)
    a.setup()
    b.setup()
    for split in ("train", "val", "test"):
        assert [r.image_path for r in a.rows(split)] == [r.image_path for r in b.rows(split)]


def test_class_weights_are_n_over_n_c(tmp_path):
    source = make_images(tmp_path, 4, 1, split_of=lambda p: ["train", "train", "val", "test"][p])
    with source.open("a", newline="") as f:  # three more 4CH training images
        for k in range(3):
            rel = f"frames/4CH/p0_extra{k}.png"
            cv2.imwrite(str(tmp_path / rel), np.zeros((40, 48), np.uint8))
            f.write(f"{rel},4CH,p0,train\n")
    dm = datamodule(source)
    dm.setup()
    assert list(dm.class_counts()) == [5, 2, 2, 2, 2]
    torch.testing.assert_close(dm.class_weights(), torch.tensor([13 / 5, 13 / 2, 13 / 2, 13 / 2, 13 / 2]))


def test_class_folder_source_uses_patient_pattern(tmp_path):
    make_images(tmp_path, 10, 2)
    dm = datamodule(tmp_path / "frames")
    dm.setup()
    rows = [r for s in ("train", "val", "test") for r in dm.rows(s)]
    assert len(rows) == 10 * 5 * 2
    assert {r.patient_id for r in rows} == {f"p{i}" for i in range(10)}
    assert rows[0].image_path.split("/")[0] in CLASSES  # relative to the class-folder root


def test_test_dataset_paths_follow_loader_order(tmp_path):
    source = make_images(tmp_path, 10, 2, value_of=lambda p, label: 20 * p)
    dm = datamodule(source)
    dm.setup()
    dataset = dm.dataset("test")
    values = torch.cat([x[:, 0, 0, 0] for x, _ in dm.test_dataloader()])
    patients = [int(path.split("/")[-1].split("_")[0][1:]) for path in dataset.image_paths]
    torch.testing.assert_close(values, (20 * torch.tensor(patients) / 255 - 0.5) / 0.25)


# ---- errors before training, naming file and row --------------------------------------------------------
def test_missing_column_fails_at_setup(tmp_path):
    source = tmp_path / "labels.csv"
    source.write_text("path,label,patient_id\na.png,4CH,p0\n")
    with pytest.raises(ManifestError, match=r"labels.csv: missing column\(s\) \['image_path'\]"):
        datamodule(source).setup()


def test_missing_file_fails_at_setup_naming_row(tmp_path):
    source = make_images(tmp_path, 10, 1)
    victim = read_csv_rows(source)[6]["image_path"]  # line 8 of the CSV
    (tmp_path / victim).unlink()
    with pytest.raises(ManifestError, match=rf"labels.csv, row 8: image file .*{victim} does not exist"):
        datamodule(source).setup()


def test_label_outside_class_list_fails_naming_row(tmp_path):
    source = make_images(tmp_path, 10, 1)
    with pytest.raises(ManifestError, match=r"labels.csv, row \d+: label '3VT' is not in data.classes"):
        datamodule(source, classes=CLASSES[:4]).setup()


def test_class_empty_in_a_split_fails(tmp_path):
    source = make_images(tmp_path, 3, 1, split_of=lambda p: ["train", "val", "test"][p])
    lines = [line for line in source.read_text().splitlines() if not ("RVOT" in line and line.endswith(",val"))]
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match="split 'val' has no image of class 'RVOT'"):
        datamodule(source).setup()


def test_too_few_patients_for_a_split_fails(tmp_path):
    source = make_images(tmp_path, 2, 1)
    with pytest.raises(ManifestError, match="has no image of class"):
        datamodule(source).setup()


def test_unreadable_image_stops_setup_with_its_row_whatever_split_it_is_in(tmp_path):
    source = make_images(tmp_path, 10, 1)
    victim = tmp_path / read_csv_rows(source)[-1]["image_path"]
    victim.write_bytes(b"not a png")  # a text file named .png
    with pytest.raises(ManifestError, match=rf"labels.csv, row {len(read_csv_rows(source)) + 1}: .*{victim.name} cannot be decoded"):
        datamodule(source).setup()  # before any loader, any worker, any training
