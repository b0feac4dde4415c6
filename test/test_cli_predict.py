"""openvla-predict on bad input: exit 2 with one `error:` line, no traceback, and the node's checks
(openvla_model.inputs) for the image and the instruction, before any weights are loaded."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from test_inputs import jpeg_bomb, png_bomb


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import cv2

    from openvla_model.synthetic import synthetic_rgb

    d = tmp_path_factory.mktemp("images")
    bgr = np.ascontiguousarray(synthetic_rgb(seed=4, height=480, width=640)[..., ::-1])
    jpg = cv2.imencode(".jpg", bgr)[1].tobytes()
    png = cv2.imencode(".png", bgr)[1].tobytes()
    mid = len(jpg) * 2 // 3
    files = {"good.jpg": jpg, "good.png": png, "half.jpg": jpg[: len(jpg) // 2],
             "marker_in_scan.jpg": jpg[:mid] + b"\xff\xd9" + jpg[mid + 2:], "half.png": png[: len(png) // 2],
             "bomb.jpg": jpeg_bomb(), "bomb.png": png_bomb()}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def _run(capsys, *argv) -> tuple[int, str, str]:
    from openvla_model.cli import predict_main

    rc = predict_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_unknown_device_exits_2_with_one_line_listing_the_valid_devices(tiny_weights, images):
    """A real process: the line a user sees, and no torch RuntimeError traceback."""
    cmd = [sys.executable, "-m", "openvla_model.cli_predict", "--weights", str(tiny_weights),
           "--image", str(images / "good.png"), "--instruction", "pick up the cup", "--device", "tpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2, p.stderr[-2000:]
    line = _one_error_line(p.stderr)
    assert "'tpu'" in line and all(d in line for d in ("auto", "cpu", "cuda", "cuda:N")), line
    assert p.stdout == ""


@pytest.mark.parametrize("name,expect", [
    ("half.jpg", "corrupt or truncated JPEG.*Premature end of JPEG file"),
    ("marker_in_scan.jpg", "corrupt or truncated JPEG.*Corrupt JPEG data"),
    ("half.png", "corrupt or truncated PNG"),
    ("bomb.jpg", "20000x20000 has 400000000 pixels.*max_image_pixels"),
    ("bomb.png", "20000x20000 has 400000000 pixels.*max_image_pixels"),
])
def test_corrupt_truncated_and_oversized_images_exit_2_with_one_line(capsys, monkeypatch, tiny_weights, images,
                                                                     name, expect):
    import re

    import cv2
    import simplejpeg

    if name.startswith("bomb"):  # refused from the header: no decoder may see it
        def never(*a, **k):
            pytest.fail("decoder called for a decompression bomb")
        monkeypatch.setattr(simplejpeg, "decode_jpeg", never)
        monkeypatch.setattr(cv2, "imdecode", never)
    rc, out, err = _run(capsys, "--weights", tiny_weights, "--image", images / name, "--instruction", "pick up the cup",
                        "--device", "cpu", "--unnorm-key", "bridge_orig")
    assert rc == 2, (out, err)
    line = _one_error_line(err)
    assert line.startswith(f"error: {images / name}: ") and re.search(expect, line), line
    assert out == ""


def test_max_image_pixels_is_an_option(capsys, tiny_weights, images):
    rc, _, err = _run(capsys, "--weights", tiny_weights, "--image", images / "good.jpg", "--instruction", "pick",
                      "--max-image-pixels", 640 * 480 - 1)
    assert rc == 2 and "640x480 has 307200 pixels, more than the limit of 307199" in _one_error_line(err)


@pytest.mark.parametrize("instruction,expect", [
    ("pick up the \ufffd cup", "invalid UTF-8"),
    ("pick up\x00 the cup", "non-printable"),
    ("   ", "empty instruction"),
    ("x" * 1001, "exceeds max_instruction_chars 1000"),
])
def test_instructions_the_node_refuses_exit_2(capsys, tiny_weights, images, instruction, expect):
    rc, out, err = _run(capsys, "--weights", tiny_weights, "--image", images / "good.jpg",
                        "--instruction", instruction, "--device", "cpu", "--unnorm-key", "bridge_orig")
    assert rc == 2 and expect in _one_error_line(err) and out == "", (rc, out, err)


def test_a_good_frame_runs_with_the_instruction_as_the_node_cleans_it(capsys, tiny_weights, images):
    """Whitespace runs become one space, as on the instruction topic: same prompt, same action."""
    rc, out, err = _run(capsys, "--weights", tiny_weights, "--image", images / "good.jpg",
                        "--instruction", "  pick   up\tthe cup ", "--device", "cpu", "--dtype", "float32",
                        "--unnorm-key", "bridge_orig", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["instruction"] == "pick up the cup"
    assert len(result["action"]) == 7 and all(np.isfinite(result["action"]))
