"""Mounting an index as a read-only file through FUSE."""
