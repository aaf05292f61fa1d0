"""Augmentation presets (YAML) and the shared channel/normalisation helpers."""

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fetalssl.data.transforms import CropToContent, content_bbox, to_normalised_tensor, with_channels

AUGMENT = Path(__file__).parents[1] / "src" / "fetalssl" / "conf" / "augment"
PRESETS = ["barlowtwins", "simclr", "autoencoder", "ultrasound"]


def load_preset(name: str, image_size: int = 48):
    cfg = OmegaConf.create(
        {"data": {"image_size": image_size}, "augment": OmegaConf.load(AUGMENT / f"{name}.yaml")}
    )
    return instantiate(cfg.augment)


def sector_frame(h=90, w=120, seed=0) -> np.ndarray:
    """Gray frame with a bright speckled region on black, like a B-mode sector."""
    frame = np.zeros((h, w), np.uint8)
    frame[20:80, 30:100] = np.random.default_rng(seed).integers(40, 220, (60, 70))
    return frame


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_give_two_composes_at_image_size(name, channels):
    views = load_preset(name)
    assert set(views) == {"view1", "view2"}
    assert all(isinstance(v, A.Compose) for v in views.values()) and views["view1"] is not views["view2"]
    image = with_channels(sector_frame(), channels)
    for view in views.values():
        out = view(image=image)["image"]
        assert out.shape == (48, 48, channels) and out.dtype == np.uint8


def test_barlowtwins_views_are_asymmetric_as_in_the_paper():
    views = load_preset("barlowtwins")
    probs = {name: {type(t).__name__: t.p for t in v.transforms} for name, v in views.items()}
    assert probs["view1"]["GaussianBlur"] == 1.0 and probs["view2"]["GaussianBlur"] == 0.1
    assert "Solarize" not in probs["view1"] and probs["view2"]["Solarize"] == 0.2
    crop = views["view1"].transforms[0]
    assert crop.size == (48, 48) and tuple(crop.scale) == (0.08, 1.0)
    jitter = next(t for t in views["view1"].transforms if isinstance(t, A.ColorJitter))
    assert jitter.p == 0.8 and tuple(jitter.brightness) == pytest.approx((0.6, 1.4))


def test_ultrasound_preset_has_no_hue_or_solarize():
    names = {type(t).__name__ for v in load_preset("ultrasound").values() for t in v.transforms}
    assert not names & {"ColorJitter", "Solarize", "HueSaturationValue", "ToGray"}
    assert {"CropToContent", "MultiplicativeNoise", "RandomGamma", "Rotate"} <= names


def test_seeded_compose_is_reproducible():
    views = load_preset("simclr")
    image = with_channels(sector_frame(), 3)
    outs = []
    for _ in range(2):
        views["view1"].set_random_seed(7)
        outs.append(views["view1"](image=image)["image"])
    np.testing.assert_array_equal(*outs)


def test_crop_to_content_keeps_the_sector():
    frame = sector_frame()
    assert content_bbox(frame, 10) == ((20, 80), (30, 100))
    cropped = A.Compose([CropToContent(threshold=10, margin=0.0)])(image=frame[..., None])["image"]
    assert cropped.shape == (60, 70, 1) and cropped.min() >= 40
    blank = np.zeros((10, 10, 1), np.uint8)
    assert CropToContent()(image=blank)["image"].shape == (10, 10, 1)


def test_channels_and_normalisation():
    gray = np.array([[0, 255]], np.uint8)
    three = with_channels(gray, 3)
    assert three.shape == (1, 2, 3) and (three[..., 0] == three[..., 2]).all()
    assert with_channels(gray, 1).shape == (1, 2, 1)
    assert with_channels(np.dstack([gray] * 3), 1).shape == (1, 2, 1)
    with pytest.raises(ValueError, match="channels"):
        with_channels(gray, 2)
    tensor = to_normalised_tensor(three, mean=0.5, std=0.25)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 1, 2)
    torch.testing.assert_close(tensor[:, 0, :], torch.tensor([[-2.0, 2.0]] * 3))


@pytest.mark.filterwarnings("ignore:The image is already gray")
@pytest.mark.parametrize("name", sorted(p.stem for p in AUGMENT.glob("*.yaml")))
def test_a_gray_frame_augmented_as_one_channel_is_the_rgb_pipelines_image(name):
    # why the pretraining loader augments gray frames in one channel: the same views at a third of the pixel work
    cfg = OmegaConf.create({"data": {"image_size": 48}, "augment": OmegaConf.load(AUGMENT / f"{name}.yaml")})
    import fetalssl.runtime  # noqa: F401  (multicrop's scaled_size resolver)

    views = instantiate(cfg.augment)
    pipelines = [views["view1"], views["view2"], *views.get("locals", [])[:1]]
    gray = sector_frame()
    for pipeline in pipelines:
        for seed in range(40):  # colour jitter fires with p 0.8, solarize 0.2, gray 0.2: every op is drawn
            pipeline.set_random_seed(seed)
            one = pipeline(image=with_channels(gray, 1))["image"]
            pipeline.set_random_seed(seed)
            three = pipeline(image=with_channels(gray, 3))["image"]
            assert np.array_equal(np.repeat(one, 3, axis=-1), three), (name, seed)

