"""Robot-side image preparation of OpenVLA-OFT (the deploy utils' prepare_images_for_vla), without
TensorFlow.

A frame that is not already S x S (224) is JPEG-encoded and decoded (quality 95, 4:2:0, as
tf.image.encode_jpeg / tf.io.decode_image), then resized with TensorFlow's antialiased lanczos3
(tf.image.resize(method="lanczos3", antialias=True): the RLDS training pipeline's resize), rounded
half-to-even and clipped to uint8. The optional center crop and the normalisation are the shared
Preprocessor's (model/preprocess.py): after this step the frame is S x S, so its bicubic resize
is a no-op, as the official processor's is.

The lanczos3 resize follows TensorFlow's ScaleAndTranslate kernel: a separable filter, rows first
then columns, in float32; output pixel x samples the input at (x + 0.5) / scale; when
downscaling (antialias) the kernel is stretched by 1 / scale (its support grows from 3 to
3 / scale input pixels); each output's weights are normalised to sum to 1; the kernel is
3 sin(pi x) sin(pi x / 3) / (pi x)^2 for |x| < 3 (1 for |x| <= 1e-3). Agreement with TensorFlow:
see docs/oft.md (MAX_ABS_DIFF_VS_TF below).
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .preprocess import validate_rgb

JPEG_QUALITY = 95  # tf.image.encode_jpeg default
LANCZOS_RADIUS = 3.0
_PI = np.float32(3.14159265359)  # the constant TensorFlow's kernel uses

# Largest |ours - TensorFlow| in uint8 levels after the JPEG round trip + resize, measured against
# tensorflow-cpu 2.21 in a throw-away venv on 21 frames of 10x12 .. 720x1280 (docs/oft.md): 1 level
# on about 1e-5 of the values (float32 sums landing on the other side of .5), the JPEG round trip
# itself bit-exact. test/test_oft.py checks it against stored TensorFlow outputs.
MAX_ABS_DIFF_VS_TF = 1


def lanczos3(x: np.ndarray) -> np.ndarray:
    x = np.abs(np.asarray(x, np.float32))
    safe = np.where(x <= 1e-3, np.float32(1.0), x)
    r = np.float32(LANCZOS_RADIUS)
    v = r * np.sin(_PI * safe) * np.sin(_PI * safe / r) / (_PI * _PI * safe * safe)
    return np.where(x > r, np.float32(0.0), np.where(x <= 1e-3, np.float32(1.0), v)).astype(np.float32)


def lanczos3_matrix(in_size: int, out_size: int, antialias: bool = True) -> np.ndarray:
    """(out_size, in_size) float32 resampling matrix of one axis (TensorFlow's spans, dense)."""
    scale = np.float32(out_size) / np.float32(in_size)
    inv_scale = np.float32(1.0 / float(scale))
    kernel_scale = max(inv_scale, np.float32(1.0)) if antialias else np.float32(1.0)
    radius = np.float32(LANCZOS_RADIUS) * kernel_scale
    w = np.zeros((out_size, in_size), np.float32)
    for x in range(out_size):
        sample = (np.float32(x) + np.float32(0.5)) * inv_scale
        start = int(np.ceil(sample - radius - np.float32(0.5)))
        end = int(np.floor(sample + radius - np.float32(0.5)))
        start, end = min(max(start, 0), in_size - 1), min(max(end, 0), in_size - 1) + 1
        src = np.arange(start, end, dtype=np.float32)
        weights = lanczos3((src + np.float32(0.5) - sample) * (np.float32(1.0) / kernel_scale))
        total = np.float32(weights.sum(dtype=np.float32))
        if abs(total) >= 1000.0 * np.finfo(np.float32).tiny:
            w[x, start:end] = weights * (np.float32(1.0) / total)
    return w


_MATRICES: dict[tuple[int, int], np.ndarray] = {}


def _matrix(in_size: int, out_size: int) -> np.ndarray:
    key = (in_size, out_size)
    if key not in _MATRICES:
        if len(_MATRICES) > 32:  # camera sizes rarely change; keep the cache small anyway
            _MATRICES.clear()
        _MATRICES[key] = lanczos3_matrix(in_size, out_size)
    return _MATRICES[key]


def resize_lanczos3(rgb: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8 (antialiased lanczos3, round half to even, clip)."""
    h, w = rgb.shape[:2]
    rows, cols = _matrix(h, size), _matrix(w, size)
    x = rgb.astype(np.float32)
    tmp = np.tensordot(rows, x, axes=([1], [0]))  # (size, W, 3): rows first, like TensorFlow
    out = np.tensordot(cols, tmp, axes=([1], [1])).transpose(1, 0, 2)  # (size, size, 3)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def jpeg_round_trip(rgb: np.ndarray) -> np.ndarray:
    """Encode as JPEG and decode again, as tf.image.encode_jpeg (libjpeg defaults, quality 95, 4:2:0)
    and tf.io.decode_image (libjpeg's fast integer IDCT, fancy upsampling) do. OpenCV's encoder gives
    the same coefficients as TensorFlow's; simplejpeg's decoder with fastdct=True the same pixels
    (measured: 0 levels apart, docs/oft.md). Both libraries are already dependencies."""
    import cv2
    import simplejpeg

    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise InputError(f"JPEG encoding of a {rgb.shape[1]}x{rgb.shape[0]} frame failed")
    try:
        return simplejpeg.decode_jpeg(data.tobytes(), colorspace="RGB", fastdct=True, fastupsample=False)
    except (ValueError, RuntimeError) as e:
        raise InputError(f"JPEG round trip failed: {e}") from e


def prepare_image(rgb, size: int = 224) -> np.ndarray:
    """One camera frame as the OFT deploy code hands it to the processor (before center crop)."""
    validate_rgb(rgb)
    if rgb.shape == (size, size, 3):
        return rgb
    return resize_lanczos3(jpeg_round_trip(rgb), size)
