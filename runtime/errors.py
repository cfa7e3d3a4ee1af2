"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero.

Why in the runtime: it is the bottom layer (compiler -> passes -> runtime's bundle format), so a client process
raises it without loading the compiler; stip.passes.errors re-exports it for the passes.
"""

from __future__ import annotations


class StipError(Exception):
    """A problem with the user's input (file, graph, node, flag); printed without a traceback."""
