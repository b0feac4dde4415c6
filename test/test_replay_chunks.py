"""openvla-replay with an OpenVLA-OFT checkpoint (openvla_ros/replay/chunks.py) on a tiny OFT
checkpoint and a generated bag with a primary camera, a wrist camera, the robot state and ground
truth: the chunks equal the policy's own predict_chunk on the inputs the test chose for each frame,
and the per-step errors are recomputed here from the known ground truth of frame i + k."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_ros
from replay_bags import T0_NS, gt_action

pytestmark = requires_ros  # the replay tool is ROS glue (rosbags types, openvla_ros)

DIMS = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
KEY = "libero_spatial_no_noops"
INSTRUCTION = "put the bowl on the plate"
PERIOD_S = 0.1
T = 8  # the tiny OFT checkpoint is LIBERO-shaped: 8 steps x 7 dims, proprio 8


def proprio_of(i: int) -> np.ndarray:
    return np.array([0.01 * i, 0.1, 1.0, 3.0, -0.1, 0.05 * np.sin(i), 0.02, -0.02])


def wrist_rgb(i: int, h=64, w=80) -> np.ndarray:
    from openvla_model.synthetic import synthetic_rgb

    return synthetic_rgb(seed=1000 + i, height=h, width=w)


def primary_rgb(i: int, h=72, w=96) -> np.ndarray:
    from openvla_model.synthetic import synthetic_rgb

    return synthetic_rgb(seed=i, height=h, width=w)


def write_oft_episode(path: Path, n_frames: int = 12, *, proprio: str | None = "float64",
                      wrist_lag_ns: int = 0) -> Path:
    """/camera/image + /wrist/image (same stamps; written just AFTER the primary frame, as two
    drivers would), /proprio (Float64MultiArray before each frame, or JointState stamped like the
    frame), /gt_action (Float64MultiArray, gt_action(i)) and /instruction."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from openvla_ros.replay.bag import make_typestore

    store = make_typestore()
    Ty = store.types
    Header, Time = Ty["std_msgs/msg/Header"], Ty["builtin_interfaces/msg/Time"]
    Img, F64 = Ty["sensor_msgs/msg/Image"], Ty["std_msgs/msg/Float64MultiArray"]
    layout = Ty["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)

    def image(rgb, hdr):
        h, w = rgb.shape[:2]
        return Img(header=hdr, height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
                   data=rgb.reshape(-1).copy())

    with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3) as wr:
        cam = wr.add_connection("/camera/image", "sensor_msgs/msg/Image", typestore=store)
        wrist = wr.add_connection("/wrist/image", "sensor_msgs/msg/Image", typestore=store)
        ins = wr.add_connection("/instruction", "std_msgs/msg/String", typestore=store)
        gtc = wr.add_connection("/gt_action", "std_msgs/msg/Float64MultiArray", typestore=store)
        ptype = {"float64": "std_msgs/msg/Float64MultiArray", "joint_state": "sensor_msgs/msg/JointState"}
        pc = wr.add_connection("/proprio", ptype[proprio], typestore=store) if proprio else None
        wr.write(ins, T0_NS, store.serialize_cdr(Ty["std_msgs/msg/String"](data=INSTRUCTION), "std_msgs/msg/String"))
        for i in range(n_frames):
            t = T0_NS + int(i * PERIOD_S * 1e9) + 1000
            hdr = Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id="camera")
            if proprio == "float64":  # no header: matched by bag time, so written before the frame
                wr.write(pc, t - 200, store.serialize_cdr(F64(layout=layout, data=proprio_of(i)), ptype[proprio]))
            elif proprio == "joint_state":
                js = Ty["sensor_msgs/msg/JointState"](header=hdr, name=[f"j{j}" for j in range(8)],
                                                      position=proprio_of(i), velocity=np.zeros(0),
                                                      effort=np.zeros(0))
                wr.write(pc, t + 300, store.serialize_cdr(js, ptype[proprio]))
            wr.write(cam, t, store.serialize_cdr(image(primary_rgb(i), hdr), "sensor_msgs/msg/Image"))
            wt = t - wrist_lag_ns
            whdr = Header(stamp=Time(sec=wt // 10**9, nanosec=wt % 10**9), frame_id="wrist")
            wr.write(wrist, t + 100, store.serialize_cdr(image(wrist_rgb(i), whdr), "sensor_msgs/msg/Image"))
            wr.write(gtc, t + 500, store.serialize_cdr(F64(layout=layout, data=gt_action(i)),
                                                       "std_msgs/msg/Float64MultiArray"))
    return path


@pytest.fixture(scope="module")
def oft_weights(tmp_path_factory) -> Path:
    from openvla_model.oft_checkpoint import write_tiny_oft_checkpoint

    return write_tiny_oft_checkpoint(tmp_path_factory.mktemp("tiny_oft_replay"), seed=0)


@pytest.fixture(scope="module")
def oft_policy(oft_weights):
    from openvla_model.oft_policy import load_oft_policy

    p = load_oft_policy(oft_weights, device="cpu", dtype="float32")
    yield p
    p.close()


def replay(args, capsys):
    from openvla_ros.replay.cli import main

    rc = main(list(map(str, args)) + ["--quiet", "--device", "cpu", "--dtype", "float32"])
    return rc, capsys.readouterr().err


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def base_args(bag, weights, out):
    return [bag, "--weights", weights, "--unnorm-key", KEY, "--image-topic", "/camera/image",
            "--gt-action-topic", "/gt_action", "--out", out]


def read_chunks(out: Path) -> dict:
    with open(out / "chunks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    chunks = {}
    for r in rows:
        if r["step"] == "":
            continue
        chunks.setdefault(int(r["frame"]), {})[int(r["step"])] = np.array([float(r[f"pred_{d}"]) for d in DIMS])
    return {i: np.stack([steps[k] for k in range(T)]) for i, steps in chunks.items()}


@pytest.mark.parametrize("proprio", ["float64", "joint_state"])
def test_chunk_replay_chunks_and_per_step_errors(tmp_path, oft_weights, oft_policy, capsys, proprio):
    n = 12
    bag = write_oft_episode(tmp_path / "ep", n_frames=n, proprio=proprio)
    out = tmp_path / "out"
    rc, err = replay(base_args(bag, oft_weights, out) + ["--wrist-image-topic", "/wrist/image",
                                                         "--proprio-topic", "/proprio", "--every", "3"], capsys)
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["kind"] == "oft_chunks" and s["partial"] is False
    assert s["chunk"] == {"num_actions_chunk": T, "action_dim": 7, "proprio_dim": 8, "num_images": 2}
    assert s["frames"]["processed"] == s["frames"]["selected"] == 4 and s["frames"]["in_bag"] == n
    chunks = read_chunks(out)
    assert sorted(chunks) == [0, 3, 6, 9]
    # each chunk is the policy's own chunk for the inputs this test put at that frame
    for i, pred in chunks.items():
        want = oft_policy.predict_chunk([primary_rgb(i), wrist_rgb(i)], INSTRUCTION, proprio=proprio_of(i),
                                        unnorm_key=KEY).actions
        np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-6)
    # step k of the chunk from frame i against gt_action(i + k); frames past the bag have no GT
    ce = s["chunk_errors"]
    assert ce["num_steps"] == T and ce["chunks"] == 4
    for k in range(T):
        pairs = [(chunks[i][k], gt_action(i + k)) for i in chunks if i + k < n]
        step = ce["per_step"][k]
        assert step["step"] == k and step["n"] == len(pairs)
        p, g = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
        for d, name in enumerate(DIMS):
            assert step["dims"][name]["mae"] == pytest.approx(np.abs(p[:, d] - g[:, d]).mean(), rel=1e-5, abs=1e-7)
            assert step["dims"][name]["rmse"] == pytest.approx(np.sqrt(((p[:, d] - g[:, d]) ** 2).mean()),
                                                               rel=1e-5, abs=1e-7)
        assert step["gripper_agreement"] == pytest.approx(((p[:, 6] > 0.5) == (g[:, 6] > 0.5)).mean())
    assert [st["n"] for st in ce["per_step"]] == [4, 4, 4, 3, 3, 3, 2, 2]
    assert s["errors_vs_gt"] == ce["per_step"][0]["dims"]
    assert s["latency_ms"]["p50"] > 0 and s["per_action_ms_p50"] == pytest.approx(s["latency_ms"]["p50"] / T)
    assert {p.name for p in out.iterdir()} >= {"chunks.csv", "summary.json", "report.md", "index.html",
                                               "chunk_errors.png", "chunk_actions.png", "openvla_replay.json"}
    report = (out / "report.md").read_text()
    assert "frame i + k" in report and "| 7 | 2 |" in report and "<table" in (out / "index.html").read_text()


def test_chunk_replay_horizon_after_max_frames_and_wrist_skew(tmp_path, oft_weights, capsys):
    """--max-frames stops the chunks, not the ground truth of their later steps; a wrist image
    older than the frame by more than the tolerance refuses that frame."""
    bag = write_oft_episode(tmp_path / "ep", n_frames=12)
    out = tmp_path / "out"
    rc, err = replay(base_args(bag, oft_weights, out) + ["--wrist-image-topic", "/wrist/image", "--proprio-topic",
                                                         "/proprio", "--max-frames", "2"], capsys)
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"]["processed"] == 2
    assert [st["n"] for st in s["chunk_errors"]["per_step"]] == [2] * T  # frames 0..8 all have GT
    lagged = write_oft_episode(tmp_path / "lag", n_frames=4, wrist_lag_ns=int(2e9))
    rc, err = replay(base_args(lagged, oft_weights, tmp_path / "out2") + [
        "--wrist-image-topic", "/wrist/image", "--proprio-topic", "/proprio"], capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert s["frames"]["processed"] == 0 and s["frames"]["rejected"] == 4
    with open(tmp_path / "out2" / "chunks.csv", newline="") as f:
        assert all("no wrist image" in r["status"] for r in csv.DictReader(f))


def test_chunk_replay_refuses_missing_or_unusable_inputs_with_one_error_line(tmp_path, oft_weights,
                                                                           tiny_weights, capsys):
    bag = write_oft_episode(tmp_path / "ep", n_frames=3)
    # the tiny OFT checkpoint has a proprio projector: proprio is required
    rc, err = replay(base_args(bag, oft_weights, tmp_path / "o1"), capsys)
    assert rc == 2 and "--proprio-topic" in one_error(err)
    rc, err = replay(base_args(bag, oft_weights, tmp_path / "o2") + ["--proprio-topic", "/nope"], capsys)
    assert rc == 2 and "'/nope' not in the bag" in one_error(err)
    rc, err = replay(base_args(bag, oft_weights, tmp_path / "o3") + ["--proprio-topic", "/camera/image"], capsys)
    assert rc == 2 and "has type sensor_msgs/msg/Image" in one_error(err)
    # OFT-only options with a plain OpenVLA checkpoint
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--image-topic", "/camera/image",
                      "--gt-action-topic", "/gt_action", "--out", tmp_path / "o4", "--proprio-topic", "/proprio"],
                     capsys)
    assert rc == 2 and "only for the offline replay of an OpenVLA-OFT checkpoint" in one_error(err)
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o).exists() and not (tmp_path / f"{o}.incomplete").exists()


def test_chunk_errors_pairs_step_k_with_frame_i_plus_k():
    """The metric itself, on numbers worked out by hand."""
    from openvla_ros.replay.chunks import chunk_errors

    pred = np.zeros((2, 3, 7))
    pred[:, :, 0] = [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]
    gt = np.full((2, 3, 7), np.nan)
    gt[0, :, 0] = [1.0, 1.0, 1.0]
    gt[1, :2, 0] = [0.0, 0.0]  # chunk 2's last step is past the bag
    e = chunk_errors(pred, gt, 0.5)
    assert [s["n"] for s in e["per_step"]] == [2, 2, 1]
    assert [s["dims"]["x"]["mae"] for s in e["per_step"]] == [pytest.approx(0.5), pytest.approx(1.0),
                                                             pytest.approx(2.0)]
    assert e["per_step"][2]["dims"]["y"]["n"] == 0 and e["per_step"][0]["mae_mean"] == pytest.approx(0.5)
