"""Errors meant for people: what was wrong, where, and what to do about it.

Every error medrecon raises on bad input is a :class:`MedreconError` (or subclass) so that the CLI can
print one clear line instead of a traceback, and tests can check the message names the file and the fix.
"""

from __future__ import annotations


class MedreconError(Exception):
    """Base class for errors caused by input, configuration or environment (not by bugs)."""

    def __init__(self, message: str, *, path: object | None = None, fix: str | None = None) -> None:
        self.message = message  # without path and fix, so a caller can re-raise it with more context
        self.path = None if path is None else str(path)
        self.fix = fix
        parts = [message]
        if path is not None and str(path) not in message:
            parts.append(f"[{path}]")
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))


class InputError(MedreconError):
    """Unreadable, inconsistent or unsupported input data (DICOM, NIfTI, zarr)."""


class ConfigError(MedreconError):
    """Invalid configuration: unknown key, wrong type, impossible combination."""


class DeviceError(MedreconError):
    """The requested computation needs hardware this machine does not have (e.g. a GPU)."""


class ResourceError(MedreconError):
    """The requested computation would exceed a configured memory budget."""
