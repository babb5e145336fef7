"""blockguard: block-layer backups chosen to meet recovery objectives."""

__version__ = "0.1.0"
