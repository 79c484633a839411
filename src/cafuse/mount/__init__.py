"""Mounting an index as a read-only file through FUSE."""

STATS_XATTR = "user.cafuse.stats"  # live statistics, JSON, on the mounted file
