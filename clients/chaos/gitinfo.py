"""Which commit a chaos run tested, for its report."""

from __future__ import annotations

import subprocess
from pathlib import Path

# Deadline of the git lookup (s); past it the commit is reported as unknown.
GIT_TIMEOUT_S = 5.0


def git_commit() -> str:
    """The short hash of HEAD of the checkout this package runs from, or ``unknown``."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT_S,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
