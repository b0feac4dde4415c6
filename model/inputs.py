"""What the pipeline accepts from outside, checked in one place: compressed images and
instruction text. `openvla-predict` and the ROS node (openvla_ros.image_conversion,
openvla_ros.safety) both call these functions, so they refuse the same inputs with the same words.

Compressed images (JPEG and PNG, the formats of image_transport's `compressed` plugin):
- The width and height come from the header (JPEG SOFn read by libjpeg-turbo's header parser,
  PNG IHDR) and are checked against `max_pixels` before any pixel is decoded: a 600-byte JPEG
  that declares 20000x20000 is refused in microseconds instead of costing gigabytes.
- JPEG is decoded by simplejpeg (libjpeg-turbo) in strict mode: every libjpeg warning is an
  error ("Premature end of JPEG file", "Corrupt JPEG data: premature end of data segment",
  "bad Huffman code", "N extraneous bytes before marker"). OpenCV and Pillow print or swallow
  these warnings and hand back a grey-filled or garbled frame. JPEG has no checksum: damage the
  decoder cannot notice (a flipped bit that still forms valid Huffman codes) is invisible to
  every decoder.
- PNG is decoded by OpenCV (libpng), which refuses truncation (a missing IEND included), bad
  chunk CRCs and bad zlib data.
- Other formats are refused: their size cannot be checked from a header here.

Every refusal raises ImageInputError / InstructionError (both InputError) with the reason.
"""
from __future__ import annotations

import struct

import numpy as np

from .errors import InputError

# A 4096x4096 frame. The node's parameter max_image_pixels and --max-image-pixels default to it.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# The node's parameter max_instruction_chars and openvla-predict's --max-instruction-chars default.
DEFAULT_MAX_INSTRUCTION_CHARS = 1000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
# Headers and metadata beyond the pixels that a compressed frame may carry (EXIF, ICC, tables).
_COMPRESSED_OVERHEAD_BYTES = 65536


class ImageInputError(InputError):
    """An image that cannot be used: undecodable, corrupt, truncated, too large or unsupported."""


class InstructionError(InputError):
    """An instruction that must not be acted on (empty, too long, unprintable, invalid UTF-8)."""


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def check_image_size(width: int, height: int, max_pixels: int) -> None:
    """Refuse an empty image or one with more than max_pixels pixels (before touching its data)."""
    if width <= 0 or height <= 0:
        raise ImageInputError(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageInputError(f"image {width}x{height} has {width * height} pixels, more than the limit of "
                              f"{max_pixels} (max_image_pixels)")


def compressed_image_header(data) -> tuple[str, int, int]:
    """(format, width, height) of a JPEG or PNG read from its header; no pixel is decoded."""
    buf = np.frombuffer(data, dtype=np.uint8)
    head = buf[:33].tobytes()
    if head.startswith(_PNG_SIGNATURE):
        # The IHDR chunk comes first: length 13, type, width, height (big-endian).
        if len(head) < 33 or head[8:16] != b"\x00\x00\x00\x0dIHDR":
            raise ImageInputError("PNG without a valid IHDR header (truncated or corrupt)")
        width, height = struct.unpack(">II", head[16:24])
        return "png", width, height
    if head.startswith(_JPEG_SOI):
        import simplejpeg

        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(buf, strict=True)
        except ValueError as e:
            raise ImageInputError(f"corrupt or truncated JPEG header: {e}") from None
        return "jpeg", width, height
    raise ImageInputError(f"not a JPEG or PNG image (first bytes {head[:8].hex(' ')}); "
                          "only JPEG and PNG are accepted")


def decode_compressed_image(data, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """JPEG or PNG bytes -> RGB uint8 (H, W, 3). The size is checked from the header first;
    truncated or corrupt data (anything the decoder reports) raises ImageInputError."""
    buf = np.frombuffer(data, dtype=np.uint8)
    size = buf.size
    if size == 0:
        raise ImageInputError("compressed image has no data")
    # A compressed frame is never larger than its raw RGBA pixels plus headers.
    if size > max_pixels * 4 + _COMPRESSED_OVERHEAD_BYTES:
        raise ImageInputError(f"compressed image of {size} bytes exceeds the limit for {max_pixels} pixels "
                              "(max_image_pixels)")
    fmt, width, height = compressed_image_header(buf)
    check_image_size(width, height, max_pixels)
    if fmt == "jpeg":
        import simplejpeg

        try:  # strict: libjpeg warnings (corrupt or missing data) raise instead of returning grey fill
            rgb = simplejpeg.decode_jpeg(buf, colorspace="RGB", strict=True)
        except ValueError as e:
            raise ImageInputError(f"corrupt or truncated JPEG ({width}x{height}, {size} bytes): {e}") from None
    else:
        import cv2

        try:
            bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        except cv2.error as e:
            raise ImageInputError(f"cannot decode PNG ({width}x{height}, {size} bytes): {e}") from None
        if bgr is None:
            raise ImageInputError(f"corrupt or truncated PNG ({width}x{height}, {size} bytes): libpng refused it "
                                  "(missing data, bad CRC or bad compressed data)")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if rgb.shape[:2] != (height, width):  # the decoder must honour the header we checked
        raise ImageInputError(f"{fmt} decoded to {rgb.shape[1]}x{rgb.shape[0]}, header said {width}x{height}")
    return rgb


def read_image_file(path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """A JPEG or PNG file -> RGB uint8, with the same checks as a camera frame. Raises
    FileNotFoundError / OSError for the file, ImageInputError (naming the file) for its content."""
    import os

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    size = os.path.getsize(path)
    if size > max_pixels * 4 + _COMPRESSED_OVERHEAD_BYTES:  # checked before reading it into memory
        raise ImageInputError(f"{path}: file of {size} bytes exceeds the limit for {max_pixels} pixels "
                              "(max_image_pixels)")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode_compressed_image(data, max_pixels)
    except ImageInputError as e:
        raise ImageInputError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# instructions
# ---------------------------------------------------------------------------------------------
def check_instruction(text, max_chars: int = DEFAULT_MAX_INSTRUCTION_CHARS) -> str:
    """Normalise an instruction (whitespace runs -> one space) or raise InstructionError.

    Refused: not a string, empty or whitespace only, longer than max_chars, U+FFFD replacement
    characters or lone surrogates (invalid UTF-8 upstream: the words the operator typed are
    lost), control or other non-printable characters."""
    if not isinstance(text, str):
        raise InstructionError(f"instruction must be a string, got {type(text).__name__}")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise InstructionError("empty instruction")
    if len(cleaned) > max_chars:
        raise InstructionError(f"instruction of {len(cleaned)} characters exceeds max_instruction_chars {max_chars}")
    if "\ufffd" in cleaned or any("\ud800" <= ch <= "\udfff" for ch in cleaned):
        raise InstructionError("instruction contains invalid UTF-8 (U+FFFD replacement characters or surrogates)")
    if not cleaned.isprintable():
        raise InstructionError("instruction contains non-printable characters")
    return cleaned
