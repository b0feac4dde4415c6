"""openvla_model.inputs, the checks the node and openvla-predict share: compressed frames (size
read from the header before any decoding; corrupt or truncated data refused whenever the decoder
can tell) and instruction text (U+FFFD and the other refusals)."""
from __future__ import annotations

import resource
import struct
import time
import zlib

import numpy as np
import pytest


@pytest.fixture(scope="module")
def frame():
    from openvla_model.synthetic import synthetic_rgb

    return synthetic_rgb(seed=1, height=480, width=640)


def _encode(rgb, ext, *params) -> bytes:
    import cv2

    return cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), list(params))[1].tobytes()


@pytest.fixture(scope="module")
def jpeg(frame):
    import cv2

    return _encode(frame, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 90)


@pytest.fixture(scope="module")
def png(frame):
    return _encode(frame, ".png")


def _scan_start(jpeg: bytes) -> int:
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big")


def _png_chunks(png: bytes):
    pos, out = 8, []
    while pos < len(png):
        n = int.from_bytes(png[pos:pos + 4], "big")
        out.append((pos, png[pos + 4:pos + 8], n))
        pos += 12 + n
    return out


def jpeg_bomb() -> bytes:
    """A ~700-byte JPEG whose SOF0 declares 20000x20000 (decoding it costs ~1.2 GB of pixels)."""
    from openvla_model.synthetic import synthetic_rgb

    small = bytearray(_encode(synthetic_rgb(seed=2, height=16, width=16), ".jpg"))
    sof = small.index(b"\xff\xc0")
    small[sof + 5:sof + 9] = struct.pack(">HH", 20000, 20000)
    return bytes(small)


def png_bomb() -> bytes:
    """A small PNG whose IHDR declares 20000x20000, with a valid IHDR CRC."""
    from openvla_model.synthetic import synthetic_rgb

    small = bytearray(_encode(synthetic_rgb(seed=2, height=16, width=16), ".png"))
    small[16:24] = struct.pack(">II", 20000, 20000)
    small[29:33] = struct.pack(">I", zlib.crc32(bytes(small[12:29])))
    return bytes(small)


# ---------------------------------------------------------------------------------------------
# corrupt and truncated frames
# ---------------------------------------------------------------------------------------------
def test_truncated_jpegs_are_refused(frame, jpeg):
    """The issue's frame: the first half of a valid 640x480 JPEG decodes with grey fill in
    OpenCV. Also refused: only the end-of-image marker missing. The intact frame decodes."""
    from openvla_model.inputs import ImageInputError, decode_compressed_image

    out = decode_compressed_image(jpeg)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - frame).mean() < 5  # JPEG loss
    assert np.abs(out[..., ::-1].astype(int) - frame).mean() > 20  # and R/B swapped would show
    for what, data in {"first half": jpeg[: len(jpeg) // 2], "no EOI": jpeg[:-2],
                       "last 100 bytes missing": jpeg[:-100]}.items():
        with pytest.raises(ImageInputError, match="corrupt or truncated JPEG.*Premature end of JPEG file"):
            decode_compressed_image(data)
            pytest.fail(f"{what}: accepted")


def test_a_jpeg_is_refused_exactly_when_libjpeg_reports_its_entropy_data_corrupt(jpeg, capfd):
    """30 frames with 32 random bytes written into the entropy-coded data. libjpeg reports many
    ("Corrupt JPEG data: ...", which OpenCV only prints to stderr before returning the garbled
    frame); the others still decode to valid Huffman codes of the right count, which no decoder
    can tell from real data (JPEG has no checksum). The rule: refused iff libjpeg reports it."""
    import cv2

    from openvla_model.inputs import ImageInputError, decode_compressed_image

    rng = np.random.default_rng(7)
    start = _scan_start(jpeg)
    reported = refused = 0
    for i in range(30):
        data = bytearray(jpeg)
        pos = int(rng.integers(start, len(jpeg) - 64))
        data[pos:pos + 32] = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
        data = bytes(data)
        capfd.readouterr()
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV: "fine"
        libjpeg_says = capfd.readouterr().err
        warned = "Corrupt JPEG data" in libjpeg_says or "Premature end" in libjpeg_says
        try:
            decode_compressed_image(data)
            was_refused = False
        except ImageInputError as e:
            was_refused = True
            assert "corrupt or truncated JPEG" in str(e)
        assert was_refused == warned, f"corruption {i} at byte {pos}: libjpeg said {libjpeg_says!r}, refused={was_refused}"
        reported += warned
        refused += was_refused
    assert reported >= 8, f"only {reported} of 30 corruptions reported: the test is not exercising the decoder"


def test_a_marker_inside_the_entropy_data_is_refused(jpeg):
    """An end-of-image marker in the middle of the scan: libjpeg fills the rest with grey."""
    from openvla_model.inputs import ImageInputError, decode_compressed_image

    mid = (_scan_start(jpeg) + len(jpeg)) // 2
    data = jpeg[:mid] + b"\xff\xd9" + jpeg[mid + 2:]
    with pytest.raises(ImageInputError, match="Corrupt JPEG data"):
        decode_compressed_image(data)


def test_truncated_and_corrupt_pngs_are_refused(frame, png):
    """libpng checks every chunk's CRC and the zlib stream (Pillow accepts a missing IEND and a
    wrong CRC; it must not be swapped in). The intact frame decodes exactly."""
    from openvla_model.inputs import ImageInputError, decode_compressed_image

    np.testing.assert_array_equal(decode_compressed_image(png), frame)
    chunks = _png_chunks(png)
    idat_pos, _, idat_len = [c for c in chunks if c[1] == b"IDAT"][2]
    bad_crc = bytearray(png)
    bad_crc[idat_pos + 8 + idat_len] ^= 0xFF  # the CRC field itself
    flipped = bytearray(png)
    flipped[idat_pos + 8 + idat_len // 2] ^= 0x10  # a data byte: the CRC no longer matches
    cases = {"first half": png[: len(png) // 2], "no IEND chunk": png[:-12], "IEND cut": png[:-4],
             "bad IDAT CRC": bytes(bad_crc), "flipped IDAT byte": bytes(flipped)}
    for what, data in cases.items():
        with pytest.raises(ImageInputError, match="corrupt or truncated PNG"):
            decode_compressed_image(data)
            pytest.fail(f"{what}: accepted")


def test_only_jpeg_and_png_are_accepted(frame):
    """Other formats cannot be size-checked from a header here, so they are refused by name."""
    from openvla_model.inputs import ImageInputError, decode_compressed_image

    for ext in (".bmp", ".tiff"):
        with pytest.raises(ImageInputError, match="not a JPEG or PNG image.*only JPEG and PNG"):
            decode_compressed_image(_encode(frame[:32, :32], ext))
    with pytest.raises(ImageInputError, match="no data"):
        decode_compressed_image(b"")
    with pytest.raises(ImageInputError, match="PNG without a valid IHDR"):
        decode_compressed_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


# ---------------------------------------------------------------------------------------------
# decompression bombs
# ---------------------------------------------------------------------------------------------
def test_decompression_bombs_are_refused_from_the_header_without_decoding(monkeypatch):
    import cv2
    import simplejpeg

    from openvla_model.inputs import ImageInputError, compressed_image_header, decode_compressed_image

    jbomb, pbomb = jpeg_bomb(), png_bomb()
    assert len(jbomb) < 1000 and compressed_image_header(jbomb) == ("jpeg", 20000, 20000)
    assert compressed_image_header(pbomb) == ("png", 20000, 20000)

    def never(*args, **kwargs):
        pytest.fail("a decoder was called for a frame whose header is over max_image_pixels")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", never)
    monkeypatch.setattr(cv2, "imdecode", never)
    t0 = time.perf_counter()
    for bomb in [jbomb, pbomb] * 20:
        with pytest.raises(ImageInputError, match=r"20000x20000 has 400000000 pixels.*max_image_pixels"):
            decode_compressed_image(bomb)
    assert time.perf_counter() - t0 < 1.0
    # the limit is max_pixels itself, checked on the header's size (still no decoding)
    for data in (_encode(np.zeros((480, 640, 3), np.uint8), ".jpg"), _encode(np.zeros((480, 640, 3), np.uint8), ".png")):
        with pytest.raises(ImageInputError, match="640x480 has 307200 pixels, more than the limit of 307199"):
            decode_compressed_image(data, max_pixels=640 * 480 - 1)


def test_twenty_bombs_leave_peak_memory_flat_and_good_frames_unaffected(jpeg):
    from openvla_model.inputs import ImageInputError, decode_compressed_image

    reference = decode_compressed_image(jpeg)
    jbomb, pbomb = jpeg_bomb(), png_bomb()
    peak_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(20):
        for bomb in (jbomb, pbomb):
            with pytest.raises(ImageInputError, match="max_image_pixels"):
                decode_compressed_image(bomb)
        np.testing.assert_array_equal(decode_compressed_image(jpeg), reference)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kb) / 1024
    assert grown_mb < 100, f"peak RSS grew by {grown_mb:.0f} MB"


# ---------------------------------------------------------------------------------------------
# instructions
# ---------------------------------------------------------------------------------------------
def test_instructions_with_invalid_utf8_are_refused_and_the_other_rules_hold():
    from openvla_model.inputs import InstructionError, check_instruction

    raw = b"pick up the \xff\xfe red cup"
    for text in (raw.decode("utf-8", errors="replace"),  # what a ROS String with invalid UTF-8 becomes
                 raw.decode("utf-8", errors="surrogateescape"),  # what Python makes of such argv bytes
                 "pick up the \ufffd cup"):
        with pytest.raises(InstructionError, match="invalid UTF-8"):
            check_instruction(text, 1000)
    # valid non-ASCII text is not caught by the UTF-8 rule; the older rules still apply
    assert check_instruction("  pick   up\tthe cup \n", 100) == "pick up the cup"
    assert check_instruction("pick up the café cup", 100) == "pick up the café cup"
    assert check_instruction("把杯子拿起来", 100) == "把杯子拿起来"
    for bad, why in [("", "empty"), ("   \n\t", "empty"), ("x" * 101, "max_instruction_chars 100"),
                     ("pick\x00up", "non-printable"), ("go\x1b[2J", "non-printable"), (None, "must be a string")]:
        with pytest.raises(InstructionError, match=why):
            check_instruction(bad, 100)


def test_the_node_and_openvla_predict_use_the_one_instruction_check(monkeypatch, tmp_path, png):
    """openvla_ros.safety.check_instruction_text (the node) and openvla-predict both call
    openvla_model.inputs.check_instruction, and refuse what it refuses."""
    import openvla_model.inputs as inputs
    from openvla_model.cli import predict_main
    from openvla_ros.safety import SafetyError, check_instruction_text

    calls = []
    real = inputs.check_instruction

    def spy(text, max_chars=inputs.DEFAULT_MAX_INSTRUCTION_CHARS):
        calls.append(text)
        return real(text, max_chars)

    monkeypatch.setattr(inputs, "check_instruction", spy)
    with pytest.raises(SafetyError, match="invalid UTF-8"):
        check_instruction_text("node \ufffd text", 1000)
    image = tmp_path / "frame.png"
    image.write_bytes(png)
    assert predict_main(["--weights", str(tmp_path), "--image", str(image), "--instruction", "cli \ufffd text"]) == 2
    assert calls == ["node \ufffd text", "cli \ufffd text"]
