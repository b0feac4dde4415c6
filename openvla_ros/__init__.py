"""openvla_ros: ROS 2 glue around the ROS-free OpenVLA pipeline (``openvla_model``).

The installed ``openvla_ros`` package also holds the rosidl-generated ``openvla_ros.msg``.
``extend_path`` lets this package and that one be found as one, whichever is first on
sys.path (the source tree, a colcon install space, or the dev venv's ``openvla_ros.pkg``).
"""
import pkgutil

__path__ = pkgutil.extend_path(__path__, __name__)
