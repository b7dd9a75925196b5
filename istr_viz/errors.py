"""Typed errors that the CLI turns into one line and exit status 2.

Library code raises these and never calls ``sys.exit``. Each error names the file and the entry
(an annotation id, an image file name, a JSON key) so that a user can find the problem at once.
"""

from __future__ import annotations

from pathlib import Path


class IstrVizError(Exception):
    """Base class of every error that istr_viz reports to a user as one line."""

    def __init__(self, reason: str, file: str | Path | None = None, entry: str | None = None):
        self.reason = reason
        self.file = str(file) if file is not None else None
        self.entry = entry
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """``<file>: <entry>: <reason>``, leaving out the parts that are unknown."""
        parts = [p for p in (self.file, self.entry) if p]
        text = " ".join(self.reason.split())  # always a single line
        return ": ".join([*parts, text])


class DataError(IstrVizError):
    """A data set, annotation file or image that cannot be used as it is."""


class CheckpointError(IstrVizError):
    """A checkpoint or basis file that is missing, corrupt or of another format version."""


class ConfigError(IstrVizError):
    """An unknown configuration key or a value of the wrong type."""


class NonFiniteError(IstrVizError, ValueError):
    """A prediction, matching cost or loss became NaN or infinite (usually a diverged run)."""
