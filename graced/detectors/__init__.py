"""Detectors: sample the host and its services (blocking code, run in worker threads)."""

from .base import Detector, Observation
from .kinds import build_detector

__all__ = ["Detector", "Observation", "build_detector"]
