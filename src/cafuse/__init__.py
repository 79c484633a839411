"""cafuse: casync-compatible chunk stores and indexes, mounted lazily through FUSE."""

__version__ = "0.1.0"
