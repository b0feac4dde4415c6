"""Offline and live replay of recorded episodes (rosbag2 sqlite3 / mcap) through the policy
and the node, with metrics, plots, a report and an output bag of predicted actions."""
