"""Preprocessing vs the official path (PIL bicubic resize + torchvision to_tensor + Normalize).

Tolerance: MAX_ABS_ERROR_VS_PIL (two uint8 steps after DINOv2 normalisation, 0.0352) on the
normalised tensor; fewer than 1% of the values may differ at all, and the mean error stays < 1e-4.
A 224x224 frame needs no resize: exact (the pixels pass unchanged; only float32 rounding of the
normalisation differs). The LIBERO center crop is checked against its definition written out
here (the central 90% of the area, bilinear crop-and-resize as tf.image.crop_and_resize).
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


@pytest.mark.parametrize("seed", [6, 12])
def test_224x224_frame_is_not_resampled(config, seed):
    """No resize at the model's size: the uint8 pixels are the frame's, and the normalised tensor
    equals the official one up to float32 rounding of (x/255 - mean)/std (not a uint8 step)."""
    rgb = synthetic_rgb(seed, 224, 224)
    pre = Preprocessor(config)
    changed = int((pre.resize_uint8(rgb)[0].permute(1, 2, 0) != torch.from_numpy(rgb)).sum())
    assert changed == 0, f"{changed} uint8 values changed on a frame that needs no resize"
    err = (pre(rgb) - official_pixel_values(rgb, config)).abs().max().item()
    assert err <= 2e-6, f"max abs error {err:.2e} on a frame that needs no resize"


def test_channel_order_dinov2_then_siglip(config):
    rgb = np.zeros((224, 224, 3), np.uint8)
    rgb[..., 0] = 255
    px = Preprocessor(config)(rgb)
    d, s = config.towers
    assert px[0, 0, 0, 0].item() == pytest.approx((1 - d.mean[0]) / d.std[0], rel=1e-5)
    assert px[0, 3, 0, 0].item() == pytest.approx((1 - s.mean[0]) / s.std[0], rel=1e-5)
    assert px[0, 4, 0, 0].item() == pytest.approx((0 - s.mean[1]) / s.std[1], rel=1e-5)


def crop_and_resize_reference(img: np.ndarray, area: float = 0.9) -> np.ndarray:
    """The LIBERO center crop by its definition: the box of side sqrt(area) centred in the image
    (normalised [y1, x1, y2, x2] = (1 -+ sqrt(area)) / 2), sampled back to the same size with
    bilinear interpolation as tf.image.crop_and_resize does (output i at y1*(h-1) + i*(y2-y1)*(h-1)
    /(n-1)), float64, rounded to uint8. img: HxWx3 uint8."""
    h, w = img.shape[:2]
    side = np.sqrt(area)
    lo, hi = (1 - side) / 2, (1 + side) / 2

    def axis(n_in, n_out):
        pos = lo * (n_in - 1) + np.arange(n_out) * (hi - lo) * (n_in - 1) / (n_out - 1)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, pos - i0

    y0, y1, wy = axis(h, h)
    x0, x1, wx = axis(w, w)
    f = img.astype(np.float64)
    top = f[y0][:, x0] * (1 - wx)[None, :, None] + f[y0][:, x1] * wx[None, :, None]
    bottom = f[y1][:, x0] * (1 - wx)[None, :, None] + f[y1][:, x1] * wx[None, :, None]
    out = top * (1 - wy)[:, None, None] + bottom * wy[:, None, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed,h,w", [(8, 480, 640), (9, 224, 224), (10, 100, 300)])
def test_center_crop_is_the_central_90_percent_resampled_bilinearly(config, seed, h, w):
    rgb = synthetic_rgb(seed, h, w) if seed != 10 else np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    plain = Preprocessor(config).resize_uint8(rgb)[0].permute(1, 2, 0).numpy()
    got = Preprocessor(config, center_crop=True).resize_uint8(rgb)[0].permute(1, 2, 0).numpy()
    want = crop_and_resize_reference(plain)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (
        f"max |diff| {diff.max()} uint8 steps, {(diff > 0).mean():.2%} of the values differ")
    # the normalised tensor is the cropped pixels, normalised as without the crop
    px = Preprocessor(config, center_crop=True)(rgb)
    assert torch.equal(px, Preprocessor(config).normalize(torch.from_numpy(got).permute(2, 0, 1)[None]))


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
