"""Bearer-token authentication for `stip serve --auth-tokens FILE`.

The file: one client per line, `NAME TOKEN`, separated by whitespace; blank lines and lines starting with `#` are
ignored. NAME (letters, digits, `.`, `_`, `-`, at most 64) is the owner of that client's sequences; TOKEN is at
least 16 characters without whitespace (e.g. `python -c "import secrets; print(secrets.token_urlsafe(32))"`).
Names and tokens are unique. The file is re-read when its mtime, size or inode changes (checked at most once per
second), so adding or revoking a client needs no restart. A file that becomes unreadable or invalid refuses every
request with 503 until it is fixed: a broken edit must not keep a revoked token working.

Tokens are compared by SHA-256 digest in a dict, so the time to check a token does not depend on which
characters of a valid token it shares.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path

from stip.runtime.errors import StipError
from stip.runtime.serve_protocol import RequestError

log = logging.getLogger("stip.serve")

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_TOKEN = 16
UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="stip"'}


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, where: str) -> dict[bytes, str]:
    """token digest -> client name; StipError naming the line for anything malformed."""
    out: dict[bytes, str] = {}
    names: set[str] = set()
    for k, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise StipError(f"{where}:{k}: expected 'NAME TOKEN' (two fields), got {len(parts)}")
        name, token = parts
        if not NAME_RE.fullmatch(name):
            raise StipError(f"{where}:{k}: client name {name[:70]!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if len(token) < MIN_TOKEN:
            raise StipError(f"{where}:{k}: the token of '{name}' is shorter than {MIN_TOKEN} characters; use a "
                            "random one, e.g. secrets.token_urlsafe(32)")
        if name in names:
            raise StipError(f"{where}:{k}: client name '{name}' appears twice")
        d = _digest(token)
        if d in out:
            raise StipError(f"{where}:{k}: the token of '{name}' is also the token of '{out[d]}'")
        names.add(name)
        out[d] = name
    if not out:
        raise StipError(f"{where}: no tokens (expected lines 'NAME TOKEN')")
    return out


class TokenFile:
    """The token file, reloaded when it changes on disk."""

    def __init__(self, path: str | Path, recheck: float = 1.0):
        self.path = Path(path)
        self.recheck = recheck
        self.lock = threading.Lock()
        self.stamp: tuple | None = None
        self.checked = 0.0
        self.tokens: dict[bytes, str] | None = None
        self.broken: str | None = None
        self._load(startup=True)

    def _stamp(self) -> tuple:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode

    def _load(self, startup: bool = False) -> None:
        try:
            stamp = self._stamp()
            text = self.path.read_text()
            tokens = parse_tokens(text, str(self.path))
        except (OSError, UnicodeDecodeError, StipError) as e:
            msg = str(e) if isinstance(e, StipError) else f"{self.path}: cannot read it: {e}"
            if startup:
                raise StipError(f"--auth-tokens {msg}")
            if self.broken != msg:
                log.error("token file invalid, refusing every request until it is fixed: %s", msg)
            self.tokens, self.broken = None, msg
            self.stamp = None
            return
        if stamp[3] & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is readable by other users: chmod 600 it", self.path)
        if not startup:
            log.info("token file reloaded: %d client(s)", len(tokens))
        self.tokens, self.broken, self.stamp = tokens, None, stamp

    def maybe_reload(self) -> None:
        now = time.monotonic()
        with self.lock:
            if now - self.checked < self.recheck:
                return
            self.checked = now
            try:
                changed = self._stamp() != self.stamp
            except OSError:
                changed = True
            if changed:
                self._load()

    def owner(self, authorization: str | None) -> str:
        """The client name for an Authorization header value, or a 401 (503 while the file is broken)."""
        self.maybe_reload()
        tokens = self.tokens
        if tokens is None:
            raise RequestError(503, "the server's token file is invalid; the operator must fix it")
        if not authorization:
            raise RequestError(401, "missing 'Authorization: Bearer TOKEN' (this server requires a token)",
                               UNAUTHORIZED)
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestError(401, "the Authorization header must be 'Bearer TOKEN'", UNAUTHORIZED)
        name = tokens.get(_digest(token.strip()))
        if name is None:
            raise RequestError(401, "invalid token", UNAUTHORIZED)
        return name
