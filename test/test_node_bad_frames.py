"""openvla_node (a separate process, real DDS on loopback, image_transport compressed) against
the frames and instructions of issue 9: corrupt or truncated JPEG / PNG frames, decompression
bombs interleaved with good frames at 10 Hz, and instructions with U+FFFD. Each is counted,
warned about and never acted on; the node stays up and acts on the next good input."""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import requires_ros
from test_inputs import jpeg_bomb, png_bomb
from test_node import INSTRUCTION, ros, running_node, wait_until  # noqa: F401 (ros: fixture)

pytestmark = requires_ros


def _compressed(data: bytes, fmt: str):
    from sensor_msgs.msg import CompressedImage

    msg = CompressedImage()
    msg.format, msg.data = fmt, data
    return msg


def _encoded(seed: int, ext: str, h=96, w=128) -> bytes:
    import cv2

    from openvla_model.synthetic import synthetic_rgb

    return cv2.imencode(ext, np.ascontiguousarray(synthetic_rgb(seed=seed, height=h, width=w)[..., ::-1]))[1].tobytes()


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.fixture(scope="module")
def compressed_node(ros, tiny_weights, tmp_path_factory):
    with running_node(ros, "/bad", "openvla_bad",
                      ["backend:=torch", "device:=cpu", f"weights_path:={tiny_weights}", "unnorm_key:=bridge_orig",
                       "start_enabled:=true", "image_transport:=compressed", "diagnostics_period_s:=0.1",
                       "max_image_age_s:=5.0", "log_throttle_s:=0.2"],
                      tmp_path_factory.mktemp("bad_frames"), compressed=True, up_timeout=90,
                      clean_stop=True) as running:
        yield running


def _instruct(h, text=INSTRUCTION):
    h.send_instruction(text)
    assert h.wait_diag(lambda d: d["values"].get("instruction") == text, timeout=10), "instruction never arrived"


def _acted_on(h, key) -> bool:
    return key in h.action_stamps() | h.action_stamps(h.previews)


def test_corrupt_and_truncated_frames_are_counted_warned_and_never_acted_on(compressed_node):
    node, h = compressed_node
    _instruct(h)
    jpg = _encoded(31, ".jpg", 480, 640)  # the frame: a valid 640x480 JPEG ...
    png = _encoded(32, ".png")
    mid = len(jpg) * 2 // 3
    idat = png.index(b"IDAT")
    n = int.from_bytes(png[idat - 4:idat], "big")
    bad_crc = bytearray(png)
    bad_crc[idat + 4 + n] ^= 0xFF
    bad = {
        "first half of a JPEG": _compressed(jpg[: len(jpg) // 2], "jpeg"),
        "JPEG with corrupted entropy data": _compressed(jpg[:mid] + b"\xff\xd9" + jpg[mid + 2:], "jpeg"),
        "truncated PNG": _compressed(png[: len(png) // 2], "png"),
        "PNG with a bad CRC": _compressed(bytes(bad_crc), "png"),
    }
    for what, msg in bad.items():
        before = h.counts()["rejected_bad_image"]
        key = h.send_image(msg)
        h.wait_count("rejected_bad_image", before)
        time.sleep(0.2)  # an action for it would have been published by now
        assert not _acted_on(h, key), f"{what} was acted on"
        good = h.send_image(_compressed(_encoded(33, ".jpg"), "jpeg"))
        assert h.action_for(good, timeout=15) is not None, f"the good frame after the {what} was not acted on"
    assert wait_until(lambda: "corrupt or truncated JPEG" in node.output() and "corrupt or truncated PNG"
                      in node.output(), 5), node.output()[-3000:]
    assert node.proc.poll() is None
    assert h.counts()["callback_errors"] == 0 and h.counts()["inference_errors"] == 0


def test_decompression_bombs_are_refused_from_the_header_and_good_frames_flow_at_10_hz(compressed_node):
    """20 bombs (JPEG SOF / PNG IHDR declaring 20000x20000) between good frames at 10 Hz: the good
    frames fare as well as 20 good frames at 10 Hz without bombs, and the node's peak RSS barely moves."""
    node, h = compressed_node
    _instruct(h)
    good = _compressed(_encoded(34, ".jpg"), "jpeg")
    bombs = [_compressed(jpeg_bomb(), "jpeg"), _compressed(png_bomb(), "png")]
    h.action_for(h.send_image(good), timeout=15)  # warm
    time.sleep(0.5)

    def run(with_bombs: bool) -> int:
        keys = []
        for i in range(20):
            t0 = time.monotonic()
            if with_bombs:
                h.send_image(bombs[i % 2])
                time.sleep(0.05)
            keys.append(h.send_image(good))
            time.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))
        assert h.action_for(keys[-1], timeout=15) is not None, "the last good frame was not acted on"
        time.sleep(0.5)
        return len(h.action_stamps() & set(keys))

    baseline = run(with_bombs=False)
    peak_before = _peak_rss_mb(node.proc.pid)
    rejected_before = h.counts()["rejected_bad_image"]
    with_bombs = run(with_bombs=True)
    peak_growth = _peak_rss_mb(node.proc.pid) - peak_before
    assert peak_growth < 100, f"peak RSS grew by {peak_growth:.0f} MB over 20 bombs"
    assert with_bombs >= baseline - 3, f"good frames acted on: {with_bombs} of 20 with bombs, {baseline} without"
    assert wait_until(lambda: h.counts()["rejected_bad_image"] > rejected_before, 5)  # refused, not acted on
    assert "20000x20000" in node.output() and "max_image_pixels" in node.output()
    assert node.proc.poll() is None


def test_an_instruction_with_u_fffd_is_refused_and_clears_the_current_one(compressed_node):
    node, h = compressed_node
    _instruct(h)
    good = _compressed(_encoded(35, ".jpg"), "jpeg")
    before = h.counts()["instructions_rejected"]
    garbled = b"pick up the \xff\xfe red cup".decode("utf-8", errors="replace")  # invalid UTF-8 as it arrives
    h.send_instruction(garbled)
    h.wait_count("instructions_rejected", before)
    nothing_before = h.counts()["rejected_no_instruction"]
    key = h.send_image(good)
    h.wait_count("rejected_no_instruction", nothing_before)
    assert not _acted_on(h, key), "a frame was acted on after an instruction with U+FFFD"
    assert "invalid UTF-8" in node.output()
    _instruct(h)
    assert h.action_for(h.send_image(good), timeout=15) is not None, "node stopped acting after the refusal"
