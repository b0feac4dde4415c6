"""Image preprocessing shared by every backend (PrismaticImageProcessor, "resize-naive").

RGB uint8 HxWx3  ->  resize to 224x224 (bicubic, antialias, like PIL)  ->  [0, 1]
                 ->  normalise twice (DINOv2 stats, SigLIP stats)  ->  (1, 6, 224, 224) float32.

Resizing uses torch's antialiased bicubic kernel on uint8 (a port of PIL's fixed-point resampler),
so no PIL round trip is needed on the hot path. Measured agreement with PIL + torchvision
(test/test_preprocess.py): see MAX_ABS_ERROR_VS_PIL below.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .config import OpenVLAConfig
from .errors import InputError

# Max |ours - official| on the normalised (1,6,224,224) tensor, measured on random and
# natural-looking images of several sizes (test/test_preprocess.py asserts it). One uint8 step
# is 1/255/0.2236 = 0.0175 after DINOv2 normalisation. Measured: 0 on 224x224 input, one step
# (0.0175) on natural-looking scenes, two steps (0.0351) on random noise upsampled 100->224
# (PIL rounds to uint8 between its horizontal and vertical passes); the mean error is < 1e-4.
MAX_ABS_ERROR_VS_PIL = 0.0352

MAX_IMAGE_PIXELS = 8192 * 8192
CENTER_CROP_AREA = 0.9  # LIBERO fine-tunes: keep the central 90% of the area, resize back


def validate_rgb(rgb) -> np.ndarray:
    if not isinstance(rgb, np.ndarray):
        raise InputError(f"image must be a numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(f"image must be RGB HxWx3, got shape {tuple(rgb.shape)}")
    if rgb.dtype != np.uint8:
        raise InputError(f"image must be uint8, got {rgb.dtype}")
    h, w = rgb.shape[:2]
    if h < 1 or w < 1:
        raise InputError(f"image is empty ({h}x{w})")
    if h * w > MAX_IMAGE_PIXELS:
        raise InputError(f"image {w}x{h} exceeds the {MAX_IMAGE_PIXELS} pixel limit")
    return rgb


class Preprocessor:
    def __init__(self, config: OpenVLAConfig, center_crop: bool = False, device: str | torch.device = "cpu"):
        self.size = config.image_size
        self.center_crop = bool(center_crop)
        self.device = torch.device(device)
        mean = [m for t in config.towers for m in t.mean]
        std = [s for t in config.towers for s in t.std]
        # normalised = x/255 * scale + shift, for the 6 stacked channels
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=self.device).view(1, 6, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=self.device).view(1, 6, 1, 1)
        self._crop_grid = _center_crop_grid(self.size, self.device) if self.center_crop else None

    def resize_uint8(self, rgb: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> (1, 3, S, S) uint8 on self.device."""
        validate_rgb(rgb)
        with warnings.catch_warnings():  # read-only views of ROS message buffers are fine: never written
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(rgb))
        t = t.to(self.device, non_blocking=True)
        t = t.permute(2, 0, 1).unsqueeze(0)  # channels-last memory: the fast uint8 kernel path
        if t.shape[-2:] != (self.size, self.size):
            t = _resize_bicubic_aa(t, self.size)
        if self._crop_grid is not None:
            t = _center_crop_resize(t, self._crop_grid)
        return t

    def normalize(self, img_u8: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) uint8 -> (1, 6, S, S) float32, DINOv2 channels then SigLIP channels."""
        x = img_u8.float().repeat(1, 2, 1, 1)
        return (x * self._scale + self._shift).contiguous()

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        return self.normalize(self.resize_uint8(rgb))


def _resize_bicubic_aa(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.device.type == "cpu":
        return F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    # uint8 antialias is CPU-only: resample in float and quantise like PIL's uint8 output
    y = F.interpolate(t.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _center_crop_grid(size: int, device: torch.device) -> torch.Tensor:
    """Sampling grid of the central CENTER_CROP_AREA of the area at size x size (built once)."""
    s = math.sqrt(CENTER_CROP_AREA)
    lin = torch.linspace(-s, s, size, device=device)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([gx, gy], dim=-1).unsqueeze(0)


def _center_crop_resize(t: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Crop and resize back with bilinear sampling (like tf.image.crop_and_resize in OpenVLA's
    LIBERO evaluation)."""
    y = F.grid_sample(t.float(), grid, mode="bilinear", align_corners=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)
