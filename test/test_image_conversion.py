"""sensor_msgs/Image and CompressedImage -> RGB uint8: every supported encoding, row padding
(`step`), and a clear ImageConversionError for every malformed message."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import requires_ros

pytestmark = requires_ros


@pytest.fixture(scope="module")
def rgb():
    from openvla_model.synthetic import synthetic_rgb

    return synthetic_rgb(seed=3, height=48, width=64)


def _raw_msg(encoding, width, height, step, data):
    from sensor_msgs.msg import Image

    m = Image()
    m.encoding, m.width, m.height, m.step = encoding, width, height, step
    m.data = bytes(data)
    return m


def test_hand_built_pixels_of_each_encoding_decode_to_the_right_rgb():
    from openvla_ros.image_conversion import image_msg_to_rgb

    # 2x1 image: a red pixel then a (10, 20, 30) pixel, written byte by byte per encoding.
    red, other = (255, 0, 0), (10, 20, 30)
    cases = {
        "rgb8": [255, 0, 0, 10, 20, 30],
        "bgr8": [0, 0, 255, 30, 20, 10],
        "rgba8": [255, 0, 0, 7, 10, 20, 30, 9],
        "bgra8": [0, 0, 255, 7, 30, 20, 10, 9],
    }
    for enc, data in cases.items():
        out = image_msg_to_rgb(_raw_msg(enc, 2, 1, len(data), data))
        assert out.shape == (1, 2, 3) and out.dtype == np.uint8, enc
        assert tuple(out[0, 0]) == red and tuple(out[0, 1]) == other, enc
    mono = image_msg_to_rgb(_raw_msg("mono8", 2, 1, 2, [5, 200]))
    assert mono.tolist() == [[[5, 5, 5], [200, 200, 200]]]


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
@pytest.mark.parametrize("padding", [0, 7])
def test_colour_encodings_round_trip_and_honour_step(rgb, encoding, padding):
    from openvla_ros.image_conversion import image_msg_to_rgb, rgb_to_image_msg

    msg = rgb_to_image_msg(rgb, encoding, row_padding=padding)
    if padding:  # fill the padding with junk: it must never leak into pixels
        raw = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step).copy()
        raw[:, -padding:] = 123
        msg.data = raw.tobytes()
    assert msg.step == rgb.shape[1] * (4 if "a" in encoding else 3) + padding
    out = image_msg_to_rgb(msg)
    assert out.shape == rgb.shape
    np.testing.assert_array_equal(out, rgb)


def test_mono8_with_padding_replicates_grey(rgb):
    from openvla_ros.image_conversion import image_msg_to_rgb, rgb_to_image_msg

    msg = rgb_to_image_msg(rgb, "mono8", row_padding=3)
    out = image_msg_to_rgb(msg)
    grey = rgb.mean(axis=2).round().astype(np.uint8)
    assert out.shape == rgb.shape
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


@pytest.mark.parametrize("encoding,width,height,step,size,expect", [
    ("16UC1", 4, 4, 8, 32, "unsupported image encoding"),
    ("yuv422", 4, 4, 8, 32, "unsupported image encoding"),
    ("", 4, 4, 12, 48, "unsupported image encoding"),
    ("rgb8", 0, 0, 0, 0, "zero size"),
    ("rgb8", 4, 0, 12, 0, "zero size"),
    ("rgb8", 4, 4, 11, 44, "step 11 is smaller"),
    ("rgb8", 4, 4, 12, 47, "truncated"),
    ("rgb8", 4, 4, 12, 3, "truncated"),
    ("rgb8", 4, 4, 12, 49, "too long"),
    ("bgra8", 4, 4, 15, 60, "step 15 is smaller"),
    ("rgb8", 100000, 100000, 300000, 12, "more than the limit"),
])
def test_malformed_raw_images_raise_a_clear_error(encoding, width, height, step, size, expect):
    from openvla_ros.image_conversion import ImageConversionError, image_msg_to_rgb

    with pytest.raises(ImageConversionError, match=expect):
        image_msg_to_rgb(_raw_msg(encoding, width, height, step, b"\x01" * size))


def test_unsupported_encoding_message_lists_the_supported_ones():
    from openvla_ros.image_conversion import SUPPORTED_ENCODINGS, ImageConversionError, image_msg_to_rgb

    with pytest.raises(ImageConversionError) as e:
        image_msg_to_rgb(_raw_msg("32FC1", 1, 1, 4, b"\0\0\0\0"))
    assert all(enc in str(e.value) for enc in SUPPORTED_ENCODINGS)


def test_pixel_limit_is_a_parameter(rgb):
    from openvla_ros.image_conversion import ImageConversionError, image_msg_to_rgb, rgb_to_image_msg

    msg = rgb_to_image_msg(rgb, "rgb8")
    assert image_msg_to_rgb(msg, max_pixels=64 * 48).shape == rgb.shape
    with pytest.raises(ImageConversionError, match="max_image_pixels"):
        image_msg_to_rgb(msg, max_pixels=64 * 48 - 1)


def test_png_compressed_round_trip_is_exact_and_jpeg_is_close(rgb):
    from openvla_ros.image_conversion import compressed_msg_to_rgb, rgb_to_compressed_msg

    np.testing.assert_array_equal(compressed_msg_to_rgb(rgb_to_compressed_msg(rgb, "png")), rgb)
    jpeg = compressed_msg_to_rgb(rgb_to_compressed_msg(rgb, "jpeg", quality=95))
    assert jpeg.shape == rgb.shape and jpeg.dtype == np.uint8
    # channel order: per-channel means survive JPEG within a level or two; swapped R/B would not
    means, ref = jpeg.reshape(-1, 3).mean(0), rgb.reshape(-1, 3).mean(0)
    np.testing.assert_allclose(means, ref, atol=2.0)
    assert np.abs(ref - ref[::-1]).max() > 10  # the test image tells R from B


def test_corrupt_and_unsupported_compressed_images_raise_a_clear_error(rgb):
    from sensor_msgs.msg import CompressedImage

    from openvla_ros.image_conversion import ImageConversionError, compressed_msg_to_rgb, rgb_to_compressed_msg

    def msg(fmt, data):
        m = CompressedImage()
        m.format, m.data = fmt, bytes(data)
        return m

    rng = np.random.default_rng(0)
    png = bytes(rgb_to_compressed_msg(rgb, "png").data)
    cases = [
        (msg("jpeg", b""), "no data"),
        (msg("jpeg", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()), "cannot decode"),
        (msg("png", png[: len(png) // 3]), "cannot decode"),
        (msg("jpeg", b"\xff\xd8\xff" + b"\0" * 64), "cannot decode"),
        (msg("16UC1; compressedDepth", png), "compressed depth"),
    ]
    for m, expect in cases:
        with pytest.raises(ImageConversionError, match=expect):
            compressed_msg_to_rgb(m)
    with pytest.raises(ImageConversionError, match="max_image_pixels"):
        compressed_msg_to_rgb(msg("png", png), max_pixels=100)
