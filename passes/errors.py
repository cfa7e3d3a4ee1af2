"""StipError, re-exported: it lives in stip.runtime.errors so client processes never import the passes."""

from stip.runtime.errors import StipError

__all__ = ["StipError"]
