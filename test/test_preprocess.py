"""Preprocessing vs the official path (PIL bicubic resize + torchvision to_tensor + Normalize).

Tolerance: MAX_ABS_ERROR_VS_PIL (two uint8 steps after DINOv2 normalisation, 0.0352) on the
normalised tensor; fewer than 1% of the values may differ at all, and the mean error stays < 1e-4.
"""
import numpy as np
import pytest
import torch

from openvla_model.config import load_config
from openvla_model.errors import InputError
from openvla_model.preprocess import MAX_ABS_ERROR_VS_PIL, Preprocessor
from openvla_model.synthetic import synthetic_rgb


def official_pixel_values(rgb, config):
    from PIL import Image
    from torchvision import transforms as T

    img = Image.fromarray(rgb).convert("RGB")
    outs = []
    for tower in config.towers:
        t = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                       T.CenterCrop(224), T.ToTensor(), T.Normalize(tower.mean, tower.std)])
        outs.append(t(img))
    return torch.cat(outs, dim=0).unsqueeze(0)


@pytest.fixture(scope="module")
def config(tiny_weights):
    return load_config(tiny_weights)


IMAGES = [
    ("random 640x480", lambda: np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)),
    ("random 300x100", lambda: np.random.default_rng(2).integers(0, 256, (100, 300, 3), dtype=np.uint8)),
    ("scene 640x480", lambda: synthetic_rgb(3, 480, 640)),
    ("scene 1280x720", lambda: synthetic_rgb(4, 720, 1280)),
    ("scene 256x256", lambda: synthetic_rgb(5, 256, 256)),
    ("scene 224x224", lambda: synthetic_rgb(6, 224, 224)),
    ("scene 120x160 (upscale)", lambda: synthetic_rgb(7, 120, 160)),
]


@pytest.mark.parametrize("name,make", IMAGES, ids=[n for n, _ in IMAGES])
def test_matches_pil_torchvision_within_tolerance(config, name, make):
    rgb = make()
    ours = Preprocessor(config)(rgb)
    ref = official_pixel_values(rgb, config)
    assert ours.shape == ref.shape == (1, 6, 224, 224) and ours.dtype == torch.float32
    err = (ours - ref).abs()
    print(f"{name}: max abs error {err.max():.5f}, mean {err.mean():.2e}")
    assert err.max().item() <= MAX_ABS_ERROR_VS_PIL
    assert err.mean().item() < 1e-4
    assert (err > 1e-4).float().mean().item() < 0.01


def test_channel_order_dinov2_then_siglip(config):
    rgb = np.zeros((224, 224, 3), np.uint8)
    rgb[..., 0] = 255
    px = Preprocessor(config)(rgb)
    d, s = config.towers
    assert px[0, 0, 0, 0].item() == pytest.approx((1 - d.mean[0]) / d.std[0], rel=1e-5)
    assert px[0, 3, 0, 0].item() == pytest.approx((1 - s.mean[0]) / s.std[0], rel=1e-5)
    assert px[0, 4, 0, 0].item() == pytest.approx((0 - s.mean[1]) / s.std[1], rel=1e-5)


def test_center_crop_zooms_in(config):
    rgb = synthetic_rgb(8, 480, 640)
    plain, cropped = Preprocessor(config)(rgb), Preprocessor(config, center_crop=True)(rgb)
    assert cropped.shape == plain.shape
    assert (cropped - plain).abs().mean() > 0.01
    # the centre pixel is (nearly) unchanged by a centred crop
    assert (cropped[..., 112, 112] - plain[..., 112, 112]).abs().max() < 0.1


@pytest.mark.parametrize("bad", [
    np.zeros((0, 10, 3), np.uint8), np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
    np.zeros((10, 10, 3), np.float32), [[1, 2, 3]], np.zeros((9000, 9000, 3), np.uint8)[:, :, :2],
])
def test_bad_images_raise_input_error(config, bad):
    with pytest.raises(InputError):
        Preprocessor(config)(bad)


def test_huge_image_rejected(config, monkeypatch):
    import openvla_model.preprocess as pp

    monkeypatch.setattr(pp, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(InputError, match="pixel limit"):
        Preprocessor(config)(np.zeros((101, 100, 3), np.uint8))
