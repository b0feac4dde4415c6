"""Small rosbag2 episodes for the replay tests, written with rosbags (sqlite3 or mcap)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from openvla_model.synthetic import synthetic_rgb
from openvla_ros.replay.bag import ACTION_TYPE, make_typestore

T0_NS = 1_700_000_000 * 1_000_000_000


def gt_action(i: int) -> np.ndarray:
    """Known ground truth for frame i (robot units, gripper in [0, 1])."""
    return np.array([0.01 * np.sin(i), -0.02 + 0.001 * i, 0.005, 0.05, -0.05 * np.cos(i), 0.1, float(i % 4 < 2)])


def write_episode(path: Path, n_frames: int = 12, storage: str = "sqlite3", version: int = 9, *,
                  period_s: float = 0.1, gt: str | None = "float64", instruction: str | None = "pick up the red cup",
                  instruction_delay_s: float = 0.0, compressed: bool = False, size=(96, 128),
                  extra_image_topic: bool = False, corrupt_frame: int | None = None) -> Path:
    from rosbags.rosbag2 import StoragePlugin, Writer

    store = make_typestore()
    T = store.types
    Header, Time = T["std_msgs/msg/Header"], T["builtin_interfaces/msg/Time"]
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    h, w = size
    with Writer(path, version=version, storage_plugin=plugin) as wr:
        img_type = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
        img = wr.add_connection("/camera/image", img_type, typestore=store)
        other = wr.add_connection("/camera2/image", img_type, typestore=store) if extra_image_topic else None
        ins = wr.add_connection("/instruction", "std_msgs/msg/String", typestore=store) if instruction else None
        gt_types = {"float64": "std_msgs/msg/Float64MultiArray", "action": ACTION_TYPE,
                    "twist": "geometry_msgs/msg/TwistStamped"}
        gtc = wr.add_connection("/gt_action", gt_types[gt], typestore=store) if gt else None
        if ins is not None:
            t = T0_NS + int(instruction_delay_s * 1e9)
            wr.write(ins, t, store.serialize_cdr(T["std_msgs/msg/String"](data=instruction), "std_msgs/msg/String"))
        for i in range(n_frames):
            t = T0_NS + int(i * period_s * 1e9) + 1000
            hdr = Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id="camera")
            rgb = synthetic_rgb(i, h, w)
            if compressed:
                import cv2

                ok, data = cv2.imencode(".png", rgb[..., ::-1])
                msg = T[img_type](header=hdr, format="png", data=np.frombuffer(data.tobytes(), np.uint8))
            else:
                msg = T[img_type](header=hdr, height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
                                  data=rgb.reshape(-1).copy())
            if corrupt_frame == i and not compressed:
                msg = T[img_type](header=hdr, height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
                                  data=rgb.reshape(-1)[:100].copy())  # truncated data
            raw = store.serialize_cdr(msg, img_type)
            wr.write(img, t, raw)
            if other is not None:
                wr.write(other, t, raw)
            if gtc is not None:
                v = gt_action(i)
                if gt == "float64":
                    m = T["std_msgs/msg/Float64MultiArray"](layout=T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0),
                                                            data=v.astype(np.float64))
                elif gt == "twist":
                    V3 = T["geometry_msgs/msg/Vector3"]
                    m = T["geometry_msgs/msg/TwistStamped"](header=hdr, twist=T["geometry_msgs/msg/Twist"](
                        linear=V3(x=v[0] / 0.2, y=v[1] / 0.2, z=v[2] / 0.2), angular=V3(x=v[3] / 0.2, y=v[4] / 0.2, z=v[5] / 0.2)))
                else:
                    V3 = T["geometry_msgs/msg/Vector3"]
                    m = T[ACTION_TYPE](header=hdr, delta_position=V3(x=v[0], y=v[1], z=v[2]),
                                       delta_orientation=V3(x=v[3], y=v[4], z=v[5]), gripper=v[6], gripper_raw=v[6],
                                       normalized=np.zeros(7, np.float32), unclipped=v.astype(np.float32),
                                       tokens=np.zeros(7, np.int32), clipped=False, instruction="", unnorm_key="",
                                       inference_ms=0.0, latency_ms=0.0, sequence=i)
                wr.write(gtc, t + 500, store.serialize_cdr(m, gt_types[gt]))
    return path


def downgrade_to_humble(path: Path) -> Path:
    """Rewrite a sqlite3 bag as ROS 2 Humble records it: metadata.yaml version 5 (no ros_distro,
    custom_data or type hashes) and database schema 3 (no embedded message definitions), so the
    reader must fall back to our typestore, custom EndEffectorAction included."""
    import sqlite3

    import yaml

    meta_path = path / "metadata.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    info = meta["rosbag2_bagfile_information"]
    info["version"] = 5
    for key in ("ros_distro", "custom_data"):
        info.pop(key, None)
    for t in info["topics_with_message_count"]:
        t["topic_metadata"].pop("type_description_hash", None)
    meta_path.write_text(yaml.safe_dump(meta))
    for db in path.glob("*.db3"):
        con = sqlite3.connect(db)
        con.execute("DROP TABLE IF EXISTS message_definitions")
        con.execute("DROP TABLE IF EXISTS metadata")
        con.execute("UPDATE schema SET schema_version = 3")
        con.commit()
        con.close()
    return path
