"""finetune_mode=knn: the weighted neighbour vote against a hand computation, and a run through the usual files."""

import csv
import math

import pytest
import torch
from omegaconf import OmegaConf

from fetalssl.evaluation import weighted_knn_probs
from fetalssl.finetune.run import run_finetune
from test_downstream import make_images
from test_finetune import CONF, finetune_cfg


def test_weighted_vote_matches_a_hand_computation():
    train_x = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])  # norms differ
    train_y = torch.tensor([0, 0, 1, 1, 2])
    test_x = torch.tensor([[0.8, 0.6]])
    probs = weighted_knn_probs(train_x, train_y, test_x, k=3, temperature=0.5, num_classes=3)
    # cosine similarities: [0.8, 0.8240, 0.6, 0.96, -0.8]; the 3 nearest: rows 3 (class 1), 1 and 0 (class 0)
    s1 = 2.0 * 0.8 / math.hypot(2.0, 0.1) + 0.1 * 0.6 / math.hypot(2.0, 0.1)
    w = {0: math.exp(0.8 / 0.5) + math.exp(s1 / 0.5), 1: math.exp(0.96 / 0.5), 2: 0.0}
    total = sum(w.values())
    assert probs[0].tolist() == pytest.approx([w[c] / total for c in range(3)], rel=1e-5)
    sharp = weighted_knn_probs(train_x, train_y, test_x, k=3, temperature=0.01, num_classes=3)
    assert sharp[0].argmax() == 1  # a low temperature hands the vote to the single nearest neighbour
    assert weighted_knn_probs(train_x, train_y, test_x, k=99, temperature=0.5, num_classes=3).sum() == pytest.approx(1)
    with pytest.raises(ValueError, match="k=0"):
        weighted_knn_probs(train_x, train_y, test_x, k=0, temperature=0.5, num_classes=3)


def test_knn_run_scores_every_image_by_its_neighbours_with_the_configs_k_and_temperature(tmp_path):
    import timm
    from hydra.utils import instantiate

    from fetalssl.evaluation import extract_features

    source = make_images(tmp_path, 10, 2)
    weights = tmp_path / "backbone.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), weights)
    cfg = finetune_cfg(source)
    cfg.init.update(name="ssl", checkpoint=str(weights))
    cfg.finetune_mode = OmegaConf.load(CONF / "finetune_mode" / "knn.yaml")
    cfg.finetune_mode.update(k=3, temperature=0.2)
    result = run_finetune(cfg, tmp_path / "run")
    assert result["status"] == "ok" and result["grid"]["finetune_mode"] == "knn(k=3,T=0.2)"
    assert result["init_weights"]["path"] == str(weights.resolve())
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing saved

    images = instantiate(cfg.data, output_dir=tmp_path / "check")
    images.setup("fit")
    backbone = timm.create_model("resnet18", num_classes=0)
    backbone.load_state_dict(torch.load(weights))
    (train_x, train_y), (test_x, _) = (extract_features(backbone, images.loader(s), torch.device("cpu"))
                                       for s in ("train", "test"))
    expected = weighted_knn_probs(train_x, train_y, test_x, 3, 0.2, len(images.classes))
    with (tmp_path / "run" / "predictions.csv").open() as f:
        written = torch.tensor([[float(r[f"prob_{c}"]) for c in images.classes] for r in csv.DictReader(f)])
    torch.testing.assert_close(written, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, weighted_knn_probs(train_x, train_y, test_x, 20, 0.07, len(images.classes)))
