"""sensor_msgs/Image and sensor_msgs/CompressedImage -> RGB uint8 HxWx3 numpy arrays.

No cv_bridge (the official one is not on PyPI; the PyPI `cv-bridge` is an unofficial ROS 1
port); the same OpenCV conversions it uses. Raw images: one table (`ENCODINGS`) from encoding to
its layout and the cv2.cvtColor code that makes RGB; `step` (row padding) is honoured, 16-bit
values are scaled to 8 bits as cv_bridge does (x * 255 / 65535, rounded) and `is_bigendian` is
respected. Compressed images (JPEG, PNG) go through openvla_model.inputs, shared with
openvla-predict: size checked from the header before decoding, corrupt or truncated data refused.
Every malformed message raises ImageConversionError with a message that names the field at
fault; nothing else escapes these functions for a bad message.

The returned array may be a read-only view of the message buffer (rgb8): callers must not
write into it. The model's preprocessing copies what it needs.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from openvla_model.inputs import DEFAULT_MAX_IMAGE_PIXELS, ImageInputError, check_image_size, decode_compressed_image

# One error type for every image the node cannot use (raw or compressed); the node catches it.
ImageConversionError = ImageInputError

# Larger images are rejected before any buffer is touched (parameter max_image_pixels).
DEFAULT_MAX_PIXELS = DEFAULT_MAX_IMAGE_PIXELS


class Encoding(NamedTuple):
    channels: int  # values per pixel in the message (2 for packed 4:2:2: chroma + luma)
    value_bytes: int  # 1 or 2 (16-bit: scaled to 8 bits before the colour conversion)
    to_rgb: str | None  # cv2.cvtColor code (name) that turns the 8-bit pixels into RGB; None: already RGB


# sensor_msgs/image_encodings names -> how to read them. OpenCV names Bayer patterns by their
# second row (COLOR_BayerBG2RGB == COLOR_BayerRGGB2RGB); the RGGB-style aliases say the pattern
# starting at pixel (0, 0), as ROS does.
ENCODINGS: dict[str, Encoding] = {
    "rgb8": Encoding(3, 1, None),
    "bgr8": Encoding(3, 1, "COLOR_BGR2RGB"),
    "rgba8": Encoding(4, 1, "COLOR_RGBA2RGB"),
    "bgra8": Encoding(4, 1, "COLOR_BGRA2RGB"),
    "mono8": Encoding(1, 1, "COLOR_GRAY2RGB"),
    "bayer_rggb8": Encoding(1, 1, "COLOR_BayerRGGB2RGB"),
    "bayer_bggr8": Encoding(1, 1, "COLOR_BayerBGGR2RGB"),
    "bayer_gbrg8": Encoding(1, 1, "COLOR_BayerGBRG2RGB"),
    "bayer_grbg8": Encoding(1, 1, "COLOR_BayerGRBG2RGB"),
    "yuv422": Encoding(2, 1, "COLOR_YUV2RGB_UYVY"),  # U Y0 V Y1 (BT.601, video range)
    "yuv422_yuy2": Encoding(2, 1, "COLOR_YUV2RGB_YUY2"),  # Y0 U Y1 V
    "rgb16": Encoding(3, 2, None),
    "bgr16": Encoding(3, 2, "COLOR_BGR2RGB"),
    "rgba16": Encoding(4, 2, "COLOR_RGBA2RGB"),
    "bgra16": Encoding(4, 2, "COLOR_BGRA2RGB"),
    "mono16": Encoding(1, 2, "COLOR_GRAY2RGB"),
}
SUPPORTED_ENCODINGS = tuple(ENCODINGS)
_PACKED_422_LUMA = {"yuv422": 1, "yuv422_yuy2": 0}  # index of the luma byte in each 2-byte pixel
# Depth and other data encodings (16UC1, 32FC1, 8UC3, ...): not camera colour, named in the refusal.
_DATA_ENCODING = re.compile(r"^(8|16|32|64)(u|s|f)c\d+$")
_CV_CODES: dict[str, int] = {}


def _cv_code(name: str) -> int:
    code = _CV_CODES.get(name)
    if code is None:
        import cv2

        code = _CV_CODES[name] = getattr(cv2, name)
    return code


def _unsupported(encoding: str, raw) -> ImageConversionError:
    what = f"unsupported image encoding {raw!r}"
    if _DATA_ENCODING.match(encoding):
        what += " (depth / data encoding, not a camera colour image)"
    return ImageConversionError(f"{what}; supported: {', '.join(SUPPORTED_ENCODINGS)}")


def image_msg_to_rgb(msg, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/Image in any of SUPPORTED_ENCODINGS -> RGB uint8 (H, W, 3)."""
    encoding = str(msg.encoding).strip().lower()
    enc = ENCODINGS.get(encoding)
    if enc is None:
        raise _unsupported(encoding, msg.encoding)
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    check_image_size(width, height, max_pixels)
    bpp = enc.channels * enc.value_bytes
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
    rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, step)[:, :row_bytes]
    if enc.value_bytes == 2:
        pixels = _scale_16_to_8(rows, height, width * enc.channels, bool(getattr(msg, "is_bigendian", 0)))
    else:
        pixels = rows
    pixels = pixels.reshape(height, width, enc.channels)
    if enc.to_rgb is None:
        return pixels
    import cv2  # channel reordering and demosaicing: several times faster than numpy

    try:
        if encoding in _PACKED_422_LUMA and width % 2:
            return cv2.cvtColor(_complete_last_422_pair(pixels, _PACKED_422_LUMA[encoding]),
                                _cv_code(enc.to_rgb))[:, :width]
        return cv2.cvtColor(pixels, _cv_code(enc.to_rgb))
    except cv2.error as e:  # not expected for any size; never let it escape as something else
        raise ImageConversionError(f"cannot convert {encoding} {width}x{height}: {e}") from None


def _scale_16_to_8(rows: np.ndarray, height: int, values: int, big_endian: bool) -> np.ndarray:
    """16-bit rows (bytes) -> 8-bit values, x * 255 / 65535 rounded (cv_bridge's convertTo scale)."""
    import cv2

    words = np.ascontiguousarray(rows).view(">u2" if big_endian else "<u2").reshape(height, values)
    if words.dtype != np.uint16:  # not the machine's byte order
        words = words.astype(np.uint16)
    return cv2.convertScaleAbs(words, alpha=255.0 / 65535.0)


def _complete_last_422_pair(pixels: np.ndarray, luma: int) -> np.ndarray:
    """Packed 4:2:2 with an odd width: ROS's step rule (2 bytes per pixel) leaves the last pixel
    without its pair, so its second chroma byte is missing. OpenCV converts whole pairs only:
    append the missing pixel (luma repeated, chroma of the previous pair, neutral for 1 pixel)."""
    height, width, _ = pixels.shape
    out = np.empty((height, width + 1, 2), np.uint8)
    out[:, :width] = pixels
    out[:, width, luma] = pixels[:, width - 1, luma]
    out[:, width, 1 - luma] = pixels[:, width - 2, 1 - luma] if width >= 3 else 128
    return out


def compressed_msg_to_rgb(msg, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG or PNG, whatever `format` says) -> RGB uint8 (H, W, 3)."""
    fmt = str(msg.format).strip().lower()
    if "compresseddepth" in fmt:
        raise ImageConversionError(f"compressed depth images are not supported (format {msg.format!r})")
    return decode_compressed_image(msg.data, max_pixels)


# ---------------------------------------------------------------------------------------------
# RGB -> messages (synthetic camera, tests, benchmarks)
# ---------------------------------------------------------------------------------------------
def msg_to_rgb(msg, compressed: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (compressed) or Image -> RGB uint8: the one dispatch the node's
    streams (primary and wrist camera) and replay use."""
    return compressed_msg_to_rgb(msg, max_pixels) if compressed else image_msg_to_rgb(msg, max_pixels)


def rgb_to_image_fields(rgb: np.ndarray, encoding: str = "rgb8", *, row_padding: int = 0,
                        big_endian: bool = False) -> dict:
    """RGB uint8 (H, W, 3) -> the fields of a sensor_msgs/Image in `encoding` (height, width,
    encoding, is_bigendian, step, data), laid out as a camera driver would: Bayer mosaics sample
    one colour per pixel; yuv422 / yuv422_yuy2 are BT.601 video range with each pair's chroma
    averaged (an odd width leaves the last pixel with its first chroma byte only, step = 2 * width);
    16-bit values are x * 257. row_padding adds that many bytes at the end of every row."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    encoding = encoding.lower()
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}")
    height, width = rgb.shape[:2]
    opaque = np.full((height, width, 1), 255, np.uint8)
    base = encoding[:-2] if encoding.endswith("16") else encoding[:-1] if encoding.endswith("8") else encoding
    if base == "rgb":
        values = rgb
    elif base == "bgr":
        values = rgb[..., ::-1]
    elif base == "rgba":
        values = np.concatenate([rgb, opaque], axis=2)
    elif base == "bgra":
        values = np.concatenate([rgb[..., ::-1], opaque], axis=2)
    elif base == "mono":
        values = rgb.mean(axis=2, keepdims=True).round().astype(np.uint8)
    elif base.startswith("bayer_"):
        pattern = base[len("bayer_"):]  # colours of the 2x2 cell, row by row
        channel = np.array(["rgb".index(c) for c in pattern]).reshape(2, 2)
        yy, xx = np.mgrid[0:height, 0:width]
        values = rgb[yy, xx, channel[yy % 2, xx % 2]][..., None]
    else:
        values = _rgb_to_packed_422(rgb, luma=_PACKED_422_LUMA[encoding])
    data = np.ascontiguousarray(values).reshape(height, -1)
    if encoding.endswith("16"):
        data = (data.astype(np.uint16) * 257).astype(">u2" if big_endian else "<u2").view(np.uint8)
    if row_padding:
        data = np.concatenate([data, np.zeros((height, row_padding), np.uint8)], axis=1)
    return {"height": height, "width": width, "encoding": encoding, "is_bigendian": int(big_endian),
            "step": data.shape[1], "data": np.ascontiguousarray(data).tobytes()}


def _rgb_to_packed_422(rgb: np.ndarray, luma: int) -> np.ndarray:
    """RGB -> (H, W, 2) packed 4:2:2 bytes, BT.601 video range (what OpenCV's YUV2RGB expects)."""
    f = rgb.astype(np.float64)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    width = y.shape[1]
    even = width - width % 2
    out = np.empty(y.shape + (2,))
    out[..., luma] = y
    out[:, 0:even:2, 1 - luma] = (u[:, 0:even:2] + u[:, 1:even:2]) / 2  # each pair: U on the first pixel,
    out[:, 1:even:2, 1 - luma] = (v[:, 0:even:2] + v[:, 1:even:2]) / 2  # V on the second
    if width % 2:
        out[:, -1, 1 - luma] = u[:, -1]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def rgb_to_image_msg(rgb: np.ndarray, encoding: str = "rgb8", *, stamp=None, frame_id: str = "",
                     row_padding: int = 0, big_endian: bool = False):
    """RGB uint8 (H, W, 3) -> sensor_msgs/Image in `encoding` (see rgb_to_image_fields)."""
    from sensor_msgs.msg import Image

    msg = Image()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    for name, value in rgb_to_image_fields(rgb, encoding, row_padding=row_padding, big_endian=big_endian).items():
        setattr(msg, name, value)
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
