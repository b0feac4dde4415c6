"""pip / venv development install. On a ROS 2 machine, colcon builds CMakeLists.txt instead.

Two top-level Python packages: ``openvla_ros`` (ROS glue, from openvla_ros/) and
``openvla_model`` (the ROS-free OpenVLA pipeline, from model/).
"""
from setuptools import find_packages, setup

model_pkgs = ["openvla_model"] + ["openvla_model." + p for p in find_packages("model")]

setup(
    # Not "openvla_ros": the message build installs an egg-info of that name (rosidl), and pip
    # would uninstall the generated messages when installing this over it.
    name="openvla_ros_py",
    version="0.1.0",
    description="OpenVLA-7B for ROS 2 (TT-NN and PyTorch backends)",
    python_requires=">=3.10",
    packages=find_packages(include=["openvla_ros", "openvla_ros.*"]) + model_pkgs,
    package_dir={"openvla_model": "model"},
    entry_points={
        "console_scripts": [
            "openvla-predict=openvla_model.cli:predict_main",
            "openvla-tiny-checkpoint=openvla_model.cli:tiny_checkpoint_main",
            "openvla-bench=openvla_ros.bench:main",
            "openvla-replay=openvla_ros.replay.cli:main",
            # ROS 2 node executables (colcon installs the same from scripts/bin/ into lib/openvla_ros)
            "openvla_node=openvla_ros.node:main",
            "openvla_synthetic_camera=openvla_ros.synthetic_camera:main",
            "openvla_demo=openvla_ros.demo:main",
        ],
    },
)
