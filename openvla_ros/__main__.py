"""`python -m openvla_ros` runs openvla_node (same as `python -m openvla_ros.node`)."""
import sys

from openvla_ros.node import main

sys.exit(main())
