"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero."""

from __future__ import annotations


class StipError(Exception):
    """A problem with the user's input (file, graph, node, flag); printed without a traceback."""
