"""graced: a daemon that keeps a Linux host healthy by itself."""

__version__ = "0.1.0"
