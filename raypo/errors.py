"""The root of raypo's own errors.

Every error raypo raises for something a user can fix (a bad config or space, bad data, a
report folder it must not write, a storage location it cannot use) is a `RaypoError`, with
the message that says what and where, and the exit status the command line gives it (2, bad
input, unless the class says otherwise). Each class keeps its other base (ValueError, OSError,
RuntimeError), so code that catches those still does. The command line catches RaypoError once
(raypo.cli).
"""

from __future__ import annotations


class RaypoError(Exception):
    """An error with a message for the user; `exit_status`: what `raypo` exits with."""

    exit_status = 2
