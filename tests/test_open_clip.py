"""Published models as inits: an OpenCLIP model from config + weights files (features and zero-shot checked against
open-clip itself), any timm weight file with a key report, and the errors a wrong file gives."""

import csv
import json

import numpy as np
import open_clip
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import init_config
from fetalssl.data.transforms import pad_to_square, to_normalised_tensor
from fetalssl.finetune.init import build_backbone, input_overrides
from fetalssl.finetune.modes import last_stage_name, set_trainable
from fetalssl.finetune.run import NORMALIZATION_FILE, run_finetune
from fetalssl.models.open_clip_tower import class_text_embeddings, read_prompts, tokenizer_for
from test_downstream import CLASSES, make_images
from test_finetune import finetune_cfg

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def write_clip(folder, name="TinyCLIP", config=TINY, seed=0):
    """An OpenCLIP model made with open-clip: (config .json, weights saved as a DDP training checkpoint, model)."""
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    weights = folder / f"{name}.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    return config_path, weights, model


def clip_init(config_path, weights, **keys):
    init = init_config("open_clip")
    init.update(config=str(config_path), checkpoint=str(weights), **keys)
    return init


def test_open_clip_init_is_open_clips_encode_image_and_dictates_the_input(tmp_path):
    config_path, weights, model = write_clip(tmp_path)
    backbone, record = build_backbone(OmegaConf.create({}), clip_init(config_path, weights))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model.encode_image(x), atol=1e-5, rtol=0)
    assert backbone.num_features == 16
    assert record["config"] == str(config_path.resolve()) and record["path"] == str(weights.resolve())
    assert last_stage_name(backbone) == "visual.transformer.resblocks.1"  # finetune_mode=partial trains it ...
    assert "projection.weight" in set_trainable(backbone, "last_stage")  # ... and the projection applied after it

    assert input_overrides(clip_init(config_path, weights, pad_to_square=True)) == {
        "image_size": 32, "channels": 3, "pad_to_square": True,
        "mean": pytest.approx(list(open_clip.OPENAI_DATASET_MEAN)), "std": pytest.approx(list(open_clip.OPENAI_DATASET_STD))}
    own = tmp_path / "own"
    own.mkdir()
    config_path = own / "Own.json"
    config_path.write_text(json.dumps({**TINY, "preprocess_cfg": {"mean": [0.2, 0.2, 0.2], "std": [0.1, 0.2, 0.3]}}))
    spec = input_overrides(clip_init(config_path, weights))
    assert spec["mean"] == [0.2, 0.2, 0.2] and spec["std"] == [0.1, 0.2, 0.3]


def test_per_channel_normalisation_and_square_padding():
    image = np.array([[0, 51], [102, 255]], np.uint8)
    rgb = np.repeat(image[..., None], 3, axis=-1)
    x = to_normalised_tensor(rgb, [0.1, 0.2, 0.3], [0.5, 0.25, 0.125])
    for c, (mean, std) in enumerate([(0.1, 0.5), (0.2, 0.25), (0.3, 0.125)]):
        torch.testing.assert_close(x[c], torch.tensor((image / 255 - mean) / std, dtype=torch.float32))
    padded = pad_to_square(np.full((2, 5), 7, np.uint8))
    assert padded.shape == (5, 5) and padded[1:3].min() == 7 and padded[[0, 3, 4]].max() == 0


def test_padding_and_per_channel_values_key_the_feature_cache_and_the_grid(tmp_path):
    from fetalssl.finetune.features import images_digest
    from fetalssl.finetune.run import normalization_label
    from test_downstream import datamodule

    source = make_images(tmp_path, 10, 2)
    digests = set()
    for overrides in ({}, {"pad_to_square": True}, {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.25, 0.25]}):
        images = datamodule(source, **overrides)
        images.setup()
        digests.add(images_digest(images.dataset("test")))
    assert len(digests) == 3
    assert normalization_label([0.5, 0.4, 0.3], [0.25, 0.25, 0.25]) == "0.5,0.4,0.3/0.25,0.25,0.25"
    assert normalization_label(0.5, 0.25) == "0.5/0.25" and normalization_label(None, None) == "measured"


def test_zeroshot_run_gives_open_clips_own_probabilities_without_training_labels(tmp_path):
    config_path, weights, model = write_clip(tmp_path)
    prompts = {c: f"an ultrasound image of the {c} view" for c in CLASSES}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    cfg = finetune_cfg(make_images(tmp_path, 10, 2), "zeroshot")
    cfg.init = clip_init(config_path, weights, prompts=str(tmp_path / "prompts.json"), pad_to_square=True)
    cfg.feature_cache_dir = str(tmp_path / "cache")
    result = run_finetune(cfg, tmp_path / "run")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # val and test embedded; the training split is not
    assert result["grid"]["pad_to_square"] is True and result["grid"]["normalization"] == "init"

    assert result["status"] == "ok" and result["grid"]["finetune_mode"] == "zeroshot"
    assert result["grid"]["init"] == "open_clip" and result["grid"]["method"] == "TinyCLIP"
    assert result["train_size"] == 0 and not (tmp_path / "run" / "checkpoints").exists()
    used = json.loads((tmp_path / "run" / NORMALIZATION_FILE).read_text())
    assert used["image_size"] == 32 and used["channels"] == 3 and used["pad_to_square"] is True
    assert used["mean"] == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))

    # The same test images through open-clip's own forward: normalised embeddings and its logit scale.
    images = instantiate(OmegaConf.merge(cfg.data, {k: used[k] for k in ("image_size", "channels", "mean", "std",
                                                                         "pad_to_square")}))
    images.setup()
    x = torch.cat([batch for batch, _ in images.loader("test")])
    # padded: the 40x48 stills gain black rows, normalised per channel like any other pixel
    mean, std = torch.tensor(used["mean"]), torch.tensor(used["std"])
    torch.testing.assert_close(x[:, :, 0, 0], (-mean / std).expand(len(x), 3))
    tokens = tokenizer_for(config_path)([prompts[c] for c in CLASSES])
    with torch.no_grad():
        image_features, text_features, scale = model(x, tokens)
    expected = (scale * image_features @ text_features.T).softmax(-1)
    with (tmp_path / "run" / "predictions.csv").open() as f:
        written = torch.tensor([[float(r[f"prob_{c}"]) for c in CLASSES] for r in csv.DictReader(f)])
    torch.testing.assert_close(written, expected, atol=1e-5, rtol=1e-4)


def test_class_embedding_is_the_normalised_mean_of_normalised_prompt_embeddings(tmp_path):
    config_path, _, model = write_clip(tmp_path)
    tokenizer = tokenizer_for(config_path)
    texts = ["the four chamber view", "a 4CH plane"]
    got = class_text_embeddings(model, tokenizer, {"4CH": texts, "LVOT": ["outflow"]})
    with torch.no_grad():
        each = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    mean = each.mean(0)
    torch.testing.assert_close(got[0], mean / mean.norm(), atol=1e-6, rtol=0)
    assert got.shape == (2, 16)


def test_wrong_files_give_errors_naming_the_file_and_the_keys(tmp_path):
    config_path, weights, _ = write_clip(tmp_path)
    other_config, other_weights, _ = write_clip(tmp_path, "WiderCLIP", {**TINY, "embed_dim": 24})
    with pytest.raises(ValueError, match=r"WiderCLIP\.pt.*shape mismatch.*visual\.proj.*TinyCLIP\.json"):
        build_backbone(OmegaConf.create({}), clip_init(config_path, other_weights))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vision_cfg": {}}))
    with pytest.raises(ValueError, match=r"bad\.json.*missing keys \['embed_dim', 'text_cfg'\]"):
        build_backbone(OmegaConf.create({}), clip_init(bad, weights))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        build_backbone(OmegaConf.create({}), clip_init(config_path, tmp_path / "nowhere.pt"))

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"4CH": "a", "LVOT": "b", "XX": "c"}))
    cfg = finetune_cfg(make_images(tmp_path, 10, 2), "zeroshot")
    cfg.init = clip_init(config_path, weights, prompts=str(prompts))
    with pytest.raises(ValueError, match=r"prompts\.json: classes without prompts \['RVOT'.*unknown classes \['XX'\]"):
        run_finetune(cfg, tmp_path / "run")
    cfg.init = init_config("random")
    with pytest.raises(ValueError, match="zeroshot needs init=open_clip"):
        run_finetune(cfg, tmp_path / "run2")


def test_timm_file_loads_under_a_prefix_strictly_or_reports_what_stayed_random(tmp_path):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=0)
    state = {f"encoder.{k}": v for k, v in source.state_dict().items() if k != "layer4.1.bn2.weight"}
    state["decoder.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "usfm_like.pth")
    backbone_cfg = finetune_cfg(tmp_path).backbone
    backbone_cfg.name = "resnet34"  # init.architecture decides
    init = init_config("timm_file")
    init.update(architecture="resnet18", checkpoint=str(tmp_path / "usfm_like.pth"), key_prefix="encoder.")
    with pytest.raises(ValueError, match=r"usfm_like\.pth.*missing \(1\): \['layer4\.1\.bn2\.weight'\]"):
        build_backbone(backbone_cfg, init)
    init.strict = False
    backbone, record = build_backbone(backbone_cfg, init)
    assert record["keys"] == {"missing": ["layer4.1.bn2.weight"], "unexpected": [], "mismatched": []}
    assert record["architecture"] == "resnet18" and len(backbone.layer4) == 2  # resnet34 has 3 blocks there
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k.removeprefix("encoder.")], v) for k, v in state.items() if k.startswith("encoder."))
    init.key_prefix = None
    with pytest.raises(ValueError, match=r"unexpected .*'decoder\.weight'"):
        init.strict = True
        build_backbone(backbone_cfg, init)


def test_fetalclip_preset_points_at_the_two_published_files_and_pads():
    from hydra import compose, initialize_config_module

    from fetalssl.finetune.run import config_key

    with initialize_config_module("fetalssl.conf", version_base="1.3"):
        cfg = compose("finetune", overrides=["init=fetalclip", "finetune_mode=zeroshot", "data.root=unused",
                                             "paths.fetalclip=/models/fetalclip"])
        other_files = compose("finetune", overrides=["init=fetalclip", "finetune_mode=zeroshot", "data.root=unused",
                                                     "paths.fetalclip=/models/other"])
    assert config_key(cfg) != config_key(other_files)  # a rerun with other model files is not skipped as done
    assert cfg.init.name == "open_clip" and cfg.init.pad_to_square is True
    assert (cfg.init.config, cfg.init.checkpoint) == ("/models/fetalclip/FetalCLIP_config.json",
                                                      "/models/fetalclip/FetalCLIP_weights.pt")
    assert cfg.finetune_mode.name == "zeroshot" and cfg.finetune_mode.trainable == "none"
    assert read_prompts(OmegaConf.to_container(cfg.init.prompts), ["4CH", "LVOT", "RVOT", "3VV", "3VT"], "fetalclip.yaml").keys() == {
        "4CH", "LVOT", "RVOT", "3VV", "3VT"}
    assert cfg.init.label == "FetalCLIP"
