"""sensor_msgs/Image and CompressedImage -> RGB uint8: every supported encoding (built from a
known RGB image, and byte by byte for a few pixels), row padding (`step`), odd widths of the
packed 4:2:2 formats, 16-bit scaling as cv_bridge does, and a clear ImageConversionError for
every malformed message. The converters only read message fields, so most tests use stand-in
messages and run without ROS; one test checks real sensor_msgs messages."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import requires_ros

BAYER = ("bayer_rggb8", "bayer_bggr8", "bayer_gbrg8", "bayer_grbg8")
PACKED_422 = ("yuv422", "yuv422_yuy2")
SIXTEEN_BIT = ("rgb16", "bgr16", "rgba16", "bgra16", "mono16")
EXACT = ("rgb8", "bgr8", "rgba8", "bgra8", "rgb16", "bgr16", "rgba16", "bgra16")


@pytest.fixture(scope="module")
def rgb():
    from openvla_model.synthetic import synthetic_rgb

    return synthetic_rgb(seed=3, height=48, width=64)


@pytest.fixture(scope="module")
def smooth():
    """A smooth known RGB image (R grows left to right, G top to bottom, B falls): demosaicing and
    4:2:2 chroma sharing are nearly exact on it, so a wrong pattern or channel order stands out."""
    yy, xx = np.mgrid[0:48, 0:64].astype(np.float64)
    return np.stack([40 + 3 * xx, 30 + 4 * yy, 200 - 1.5 * xx - 1.5 * yy], -1).round().astype(np.uint8)


def _raw_msg(encoding, width, height, step, data, is_bigendian=0):
    return SimpleNamespace(encoding=encoding, width=width, height=height, step=step, data=bytes(data),
                           is_bigendian=is_bigendian)


def _built(rgb, encoding, **kw):
    from openvla_ros.image_conversion import rgb_to_image_fields

    return SimpleNamespace(**rgb_to_image_fields(rgb, encoding, **kw))


def _fill_padding(msg, padding, value=123):
    """Junk in the row padding: it must never leak into pixels."""
    raw = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.step).copy()
    raw[:, msg.step - padding:] = value
    msg.data = raw.tobytes()
    return msg


def test_the_encoding_table_covers_what_cameras_publish():
    from openvla_ros.image_conversion import SUPPORTED_ENCODINGS

    assert set(SUPPORTED_ENCODINGS) == {"rgb8", "bgr8", "rgba8", "bgra8", "mono8", *BAYER, *PACKED_422, *SIXTEEN_BIT}


def test_hand_built_pixels_of_each_byte_order_decode_to_the_right_rgb():
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


@pytest.mark.parametrize("encoding", BAYER)
def test_hand_built_bayer_mosaic_of_one_colour_decodes_to_that_colour(encoding):
    """A 6x8 mosaic of the colour (200, 100, 30), each 2x2 cell laid out as the name says."""
    from openvla_ros.image_conversion import image_msg_to_rgb

    colour = {"r": 200, "g": 100, "b": 30}
    pattern = encoding[len("bayer_"):-1]
    cell = np.array([[colour[pattern[0]], colour[pattern[1]]], [colour[pattern[2]], colour[pattern[3]]]], np.uint8)
    mosaic = np.tile(cell, (3, 4))
    out = image_msg_to_rgb(_raw_msg(encoding, 8, 6, 8, mosaic.tobytes()))
    assert out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out[1:-1, 1:-1], np.broadcast_to([200, 100, 30], (4, 6, 3)))


@pytest.mark.parametrize("encoding", PACKED_422)
def test_hand_built_packed_yuv_pixels_decode_to_textbook_colours(encoding):
    """BT.601 video range: Y 235 = white, Y 16 = black, (Y 81, U 90, V 240) = red,
    (Y 145, U 54, V 34) = green. Two pairs, written byte by byte."""
    from openvla_ros.image_conversion import image_msg_to_rgb

    # yuv422 (UYVY): U Y0 V Y1; yuv422_yuy2: Y0 U Y1 V
    data = [128, 235, 128, 16] if encoding == "yuv422" else [235, 128, 16, 128]
    white_black = image_msg_to_rgb(_raw_msg(encoding, 2, 1, 4, data))
    np.testing.assert_allclose(white_black[0].astype(int), [[255, 255, 255], [0, 0, 0]], atol=1)
    red = [90, 81, 240, 81] if encoding == "yuv422" else [81, 90, 81, 240]
    green = [54, 145, 34, 145] if encoding == "yuv422" else [145, 54, 145, 34]
    out = image_msg_to_rgb(_raw_msg(encoding, 4, 1, 8, red + green))
    np.testing.assert_allclose(out[0].astype(int), [[255, 0, 0]] * 2 + [[0, 255, 0]] * 2, atol=3)


def test_16_bit_values_are_scaled_to_8_bits_as_cv_bridge_does():
    """cv_bridge: convertTo(CV_8U, 255.0 / 65535.0) = round(x / 257); every 16-bit value checked,
    little- and big-endian (is_bigendian)."""
    from openvla_ros.image_conversion import image_msg_to_rgb

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.floor(values.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    for big in (False, True):
        data = values.astype(">u2" if big else "<u2").tobytes()
        out = image_msg_to_rgb(_raw_msg("mono16", 256, 256, 512, data, is_bigendian=int(big)))
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], expected, err_msg=f"big-endian={big}")
    # colour orders: a red and a (10, 20, 30) * 257 + 100 pixel
    px = {"rgb16": [65535, 0, 0, 2670, 5240, 7810], "bgr16": [0, 0, 65535, 7810, 5240, 2670],
          "rgba16": [65535, 0, 0, 1, 2670, 5240, 7810, 1], "bgra16": [0, 0, 65535, 1, 7810, 5240, 2670, 1]}
    for enc, words in px.items():
        out = image_msg_to_rgb(_raw_msg(enc, 2, 1, 2 * len(words), np.array(words, "<u2").tobytes()))
        assert out.tolist() == [[[255, 0, 0], [10, 20, 30]]], enc


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", *BAYER, *PACKED_422, *SIXTEEN_BIT])
@pytest.mark.parametrize("padding", [0, 5])
def test_every_encoding_built_from_a_known_rgb_image_converts_back(smooth, encoding, padding):
    from openvla_ros.image_conversion import image_msg_to_rgb

    msg = _built(smooth, encoding, row_padding=padding)
    if padding:
        _fill_padding(msg, padding)
    out = image_msg_to_rgb(msg)
    assert out.shape == smooth.shape and out.dtype == np.uint8
    err = np.abs(out.astype(int) - smooth)
    if encoding in EXACT:
        np.testing.assert_array_equal(out, smooth)
    elif encoding.startswith("mono"):
        grey = smooth.mean(axis=2).round().astype(np.uint8)
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], grey)
    elif encoding in BAYER:  # bilinear demosaicing: exact but for rounding inside, borders interpolate
        assert err[1:-1, 1:-1].max() <= 2 and err.max() <= 6, (err[1:-1, 1:-1].max(), err.max())
    else:  # 4:2:2: chroma shared by pixel pairs, BT.601 rounding
        assert err.max() <= 4 and err.mean() < 1.5, (err.max(), err.mean())


def test_16_bit_big_endian_messages_convert_like_little_endian_ones(smooth):
    from openvla_ros.image_conversion import image_msg_to_rgb

    for enc in SIXTEEN_BIT:
        little = image_msg_to_rgb(_built(smooth, enc))
        big = _built(smooth, enc, big_endian=True, row_padding=3)
        assert big.is_bigendian == 1
        np.testing.assert_array_equal(image_msg_to_rgb(_fill_padding(big, 3)), little, err_msg=enc)


@pytest.mark.parametrize("encoding", PACKED_422)
@pytest.mark.parametrize("width", [1, 3, 63])
@pytest.mark.parametrize("padding", [0, 3])
def test_packed_yuv_with_odd_widths_and_step_padding(smooth, encoding, width, padding):
    """ROS's step rule for 4:2:2 is 2 bytes per pixel, so an odd width leaves the last pixel
    without the second chroma byte of its pair: it borrows the previous pair's (neutral for a
    1-pixel-wide image). Everything else converts as for even widths; padding never leaks in."""
    from openvla_ros.image_conversion import image_msg_to_rgb

    img = np.ascontiguousarray(smooth[:, :width])
    msg = _built(img, encoding, row_padding=padding)
    assert msg.step == 2 * width + padding
    if padding:
        _fill_padding(msg, padding, value=255)
    out = image_msg_to_rgb(msg)
    assert out.shape == img.shape
    err = np.abs(out.astype(int) - img)
    if width > 1:
        assert err[:, :-1].max() <= 4, err[:, :-1].max()
        assert err[:, -1].max() <= 8, err[:, -1].max()  # chroma from the neighbouring pair: the image is smooth
    else:
        np.testing.assert_allclose(out[..., 1].astype(int), img[..., 1], atol=60)  # luma kept, chroma unknown


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1", "8UC3", "64FC1"])
def test_depth_and_data_encodings_stay_refused_with_a_clear_error(encoding):
    from openvla_ros.image_conversion import SUPPORTED_ENCODINGS, ImageConversionError, image_msg_to_rgb

    with pytest.raises(ImageConversionError) as e:
        image_msg_to_rgb(_raw_msg(encoding, 4, 4, 16, b"\0" * 64))
    msg = str(e.value)
    assert encoding in msg and "depth / data encoding, not a camera colour image" in msg
    assert all(enc in msg for enc in SUPPORTED_ENCODINGS)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
@pytest.mark.parametrize("padding", [0, 7])
def test_colour_encodings_round_trip_and_honour_step(rgb, encoding, padding):
    from openvla_ros.image_conversion import image_msg_to_rgb

    msg = _built(rgb, encoding, row_padding=padding)
    if padding:
        _fill_padding(msg, padding)
    assert msg.step == rgb.shape[1] * (4 if "a" in encoding else 3) + padding
    out = image_msg_to_rgb(msg)
    assert out.shape == rgb.shape
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("encoding,width,height,step,size,expect", [
    ("16UC1", 4, 4, 8, 32, "unsupported image encoding"),
    ("nv21", 4, 4, 8, 32, "unsupported image encoding"),
    ("", 4, 4, 12, 48, "unsupported image encoding"),
    ("rgb8", 0, 0, 0, 0, "zero size"),
    ("rgb8", 4, 0, 12, 0, "zero size"),
    ("rgb8", 4, 4, 11, 44, "step 11 is smaller"),
    ("rgb8", 4, 4, 12, 47, "truncated"),
    ("rgb8", 4, 4, 12, 3, "truncated"),
    ("rgb8", 4, 4, 12, 49, "too long"),
    ("bgra8", 4, 4, 15, 60, "step 15 is smaller"),
    ("yuv422", 5, 2, 9, 18, "step 9 is smaller"),
    ("mono16", 4, 4, 7, 28, "step 7 is smaller"),
    ("rgb16", 4, 4, 24, 95, "truncated"),
    ("bayer_rggb8", 4, 4, 4, 17, "too long"),
    ("rgb8", 100000, 100000, 300000, 12, "more than the limit"),
])
def test_malformed_raw_images_raise_a_clear_error(encoding, width, height, step, size, expect):
    from openvla_ros.image_conversion import ImageConversionError, image_msg_to_rgb

    with pytest.raises(ImageConversionError, match=expect):
        image_msg_to_rgb(_raw_msg(encoding, width, height, step, b"\x01" * size))


def test_pixel_limit_is_a_parameter(rgb):
    from openvla_ros.image_conversion import ImageConversionError, image_msg_to_rgb

    msg = _built(rgb, "rgb8")
    assert image_msg_to_rgb(msg, max_pixels=64 * 48).shape == rgb.shape
    with pytest.raises(ImageConversionError, match="max_image_pixels"):
        image_msg_to_rgb(msg, max_pixels=64 * 48 - 1)


def _compressed(fmt, data):
    return SimpleNamespace(format=fmt, data=bytes(data))


def _encode(rgb, ext, *params):
    import cv2

    return cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), list(params))[1].tobytes()


def test_png_compressed_round_trip_is_exact_and_jpeg_is_close(rgb):
    import cv2

    from openvla_ros.image_conversion import compressed_msg_to_rgb

    np.testing.assert_array_equal(compressed_msg_to_rgb(_compressed("png", _encode(rgb, ".png"))), rgb)
    jpeg_bytes = _encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    jpeg = compressed_msg_to_rgb(_compressed("jpeg", jpeg_bytes))
    assert jpeg.shape == rgb.shape and jpeg.dtype == np.uint8
    # channel order: per-channel means survive JPEG within a level or two; swapped R/B would not
    means, ref = jpeg.reshape(-1, 3).mean(0), rgb.reshape(-1, 3).mean(0)
    np.testing.assert_allclose(means, ref, atol=2.0)
    assert np.abs(ref - ref[::-1]).max() > 10  # the test image tells R from B
    # the same pixels OpenCV's libjpeg-turbo gives: the model sees what it saw before
    cv = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg_bytes, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.abs(jpeg.astype(int) - cv).max() <= 1


def test_corrupt_and_unsupported_compressed_images_raise_a_clear_error(rgb):
    from openvla_ros.image_conversion import ImageConversionError, compressed_msg_to_rgb

    rng = np.random.default_rng(0)
    png = _encode(rgb, ".png")
    jpeg = _encode(rgb, ".jpg")
    cases = [
        (_compressed("jpeg", b""), "no data"),
        (_compressed("jpeg", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()), "not a JPEG or PNG"),
        (_compressed("bmp", _encode(rgb, ".bmp")), "only JPEG and PNG"),
        (_compressed("png", png[: len(png) // 3]), "corrupt or truncated PNG"),
        (_compressed("jpeg", jpeg[: len(jpeg) // 2]), "corrupt or truncated JPEG"),
        (_compressed("jpeg", b"\xff\xd8\xff" + b"\0" * 64), "corrupt or truncated JPEG header"),
        (_compressed("16UC1; compressedDepth", png), "compressed depth"),
    ]
    for m, expect in cases:
        with pytest.raises(ImageConversionError, match=expect):
            compressed_msg_to_rgb(m)
    with pytest.raises(ImageConversionError, match="max_image_pixels"):
        compressed_msg_to_rgb(_compressed("png", png), max_pixels=100)


@requires_ros
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "bayer_grbg8", "yuv422", "mono16"])
def test_real_sensor_msgs_images_convert(smooth, encoding):
    """The node gets rclpy messages (data is an array.array): the same conversion."""
    from openvla_ros.image_conversion import image_msg_to_rgb, rgb_to_image_fields, rgb_to_image_msg

    msg = rgb_to_image_msg(smooth, encoding, row_padding=2, frame_id="camera")
    assert msg.step == rgb_to_image_fields(smooth, encoding, row_padding=2)["step"]
    np.testing.assert_array_equal(image_msg_to_rgb(msg), image_msg_to_rgb(_built(smooth, encoding, row_padding=2)))


@requires_ros
def test_real_compressed_messages_convert_and_truncated_ones_are_refused(rgb):
    from openvla_ros.image_conversion import ImageConversionError, compressed_msg_to_rgb, rgb_to_compressed_msg

    np.testing.assert_array_equal(compressed_msg_to_rgb(rgb_to_compressed_msg(rgb, "png")), rgb)
    msg = rgb_to_compressed_msg(rgb, "jpeg")
    assert compressed_msg_to_rgb(msg).shape == rgb.shape
    msg.data = msg.data[: len(msg.data) // 2]  # array.array, as rclpy delivers it
    with pytest.raises(ImageConversionError, match="corrupt or truncated JPEG"):
        compressed_msg_to_rgb(msg)
