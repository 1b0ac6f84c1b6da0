"""A Python drop-in for QEMU's virtfs-proxy-helper."""

__version__ = "0.1.0"
