"""sensor_msgs/Image and sensor_msgs/CompressedImage -> RGB uint8 HxWx3 numpy arrays.

No cv_bridge (the official one is not on PyPI; the PyPI `cv-bridge` is an unofficial ROS 1
port). Raw images are read with numpy, honouring `step` (row padding); compressed images are
decoded with cv2.imdecode. Every malformed message raises ImageConversionError with a message
that names the field at fault; nothing else escapes these functions for a bad message.

The returned array may be a read-only view of the message buffer (rgb8): callers must not
write into it. The model's preprocessing copies what it needs.
"""
from __future__ import annotations

import numpy as np

# encoding -> (bytes per pixel, how to get RGB from the HxWxC view)
_RAW_ENCODINGS = {
    "rgb8": 3,
    "bgr8": 3,
    "rgba8": 4,
    "bgra8": 4,
    "mono8": 1,
}
SUPPORTED_ENCODINGS = tuple(_RAW_ENCODINGS)

# A 4096x4096 frame; larger images are rejected before any buffer is touched.
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageConversionError(ValueError):
    """A sensor_msgs image that cannot be turned into an RGB frame (the message says why)."""


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageConversionError(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageConversionError(
            f"image {width}x{height} has {width * height} pixels, more than the limit of {max_pixels} "
            "(parameter max_image_pixels)")


def image_msg_to_rgb(msg, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8) -> RGB uint8 (H, W, 3)."""
    encoding = str(msg.encoding).strip().lower()
    bpp = _RAW_ENCODINGS.get(encoding)
    if bpp is None:
        raise ImageConversionError(
            f"unsupported image encoding {msg.encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}")
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    _check_size(width, height, max_pixels)
    row_bytes = width * bpp
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is smaller than width*{bpp} = {row_bytes} bytes for {encoding} {width}x{height}")
    expected = step * height
    size = len(msg.data)
    if size != expected:
        what = "truncated" if size < expected else "too long"
        raise ImageConversionError(
            f"image data {what}: {size} bytes, expected step*height = {step}*{height} = {expected}")
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    pixels = buf.reshape(height, step)[:, :row_bytes].reshape(height, width, bpp)
    if encoding == "rgb8":
        return pixels
    import cv2  # channel reordering: several times faster than a strided numpy copy

    code = {"bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB, "bgra8": cv2.COLOR_BGRA2RGB,
            "mono8": cv2.COLOR_GRAY2RGB}[encoding]
    return cv2.cvtColor(pixels, code)


def compressed_msg_to_rgb(msg, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg, png, anything cv2.imdecode reads) -> RGB uint8 (H, W, 3)."""
    import cv2

    fmt = str(msg.format).strip().lower()
    if "compresseddepth" in fmt:
        raise ImageConversionError(f"compressed depth images are not supported (format {msg.format!r})")
    size = len(msg.data)
    if size == 0:
        raise ImageConversionError("compressed image has no data")
    # A compressed frame is never larger than its raw RGBA pixels (plus headers).
    if size > max_pixels * 4 + 65536:
        raise ImageConversionError(
            f"compressed image of {size} bytes exceeds the limit for {max_pixels} pixels (parameter max_image_pixels)")
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as e:  # some corrupt streams raise instead of returning None
        raise ImageConversionError(f"cannot decode compressed image (format {msg.format!r}): {e}") from None
    if bgr is None:
        raise ImageConversionError(f"cannot decode compressed image (format {msg.format!r}, {size} bytes)")
    height, width = bgr.shape[:2]
    _check_size(width, height, max_pixels)
    return np.ascontiguousarray(bgr[..., ::-1])


def rgb_to_image_msg(rgb: np.ndarray, encoding: str = "rgb8", *, stamp=None, frame_id: str = "",
                     row_padding: int = 0):
    """RGB uint8 (H, W, 3) -> sensor_msgs/Image in `encoding` (for cameras, tests, benchmarks).

    row_padding adds that many bytes at the end of every row (step > width * bpp).
    """
    from sensor_msgs.msg import Image

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    encoding = encoding.lower()
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[..., ::-1]
    elif encoding == "rgba8":
        pixels = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif encoding == "bgra8":
        pixels = np.concatenate([rgb[..., ::-1], np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif encoding == "mono8":
        pixels = rgb.mean(axis=2, keepdims=True).round().astype(np.uint8)
    else:
        raise ValueError(f"unsupported encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}")
    height, width, bpp = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(height, width * bpp)
    if row_padding:
        rows = np.concatenate([rows, np.zeros((height, row_padding), np.uint8)], axis=1)
    msg = Image()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width, msg.encoding = height, width, encoding
    msg.is_bigendian = 0
    msg.step = width * bpp + row_padding
    msg.data = rows.tobytes()
    return msg


def rgb_to_compressed_msg(rgb: np.ndarray, fmt: str = "jpeg", *, stamp=None, frame_id: str = "", quality: int = 90):
    """RGB uint8 (H, W, 3) -> sensor_msgs/CompressedImage (jpeg or png)."""
    import cv2
    from sensor_msgs.msg import CompressedImage

    ext = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}.get(fmt.lower())
    if ext is None:
        raise ValueError(f"unsupported compressed format {fmt!r} (jpeg or png)")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext == ".jpg" else []
    ok, data = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:
        raise ValueError("cv2.imencode failed")
    msg = CompressedImage()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.format = "jpeg" if ext == ".jpg" else "png"
    msg.data = data.tobytes()
    return msg
