"""The output directory of `stip compile`: written whole or not at all, and never anything but a bundle replaced.

Why so careful: the directory holds the only copy of a key. The bundle is written into `.NAME.<hex>.stip-tmp/`
next to the output (mode 0700 while it is written), every file and directory is fsynced, modes are set
explicitly (umask ignored), and the temp directory then takes the output's place:
- Linux: one renameat2(RENAME_EXCHANGE), so `out/` always exists; elsewhere (or on filesystems without it),
  out -> `.NAME.stip-old`, tmp -> out. A crash between those two renames is repaired by the next compile, which
  puts the old bundle back.
- One writer per output: `.NAME.stip-lock` (flock, released by the kernel when its holder dies, even by
  SIGKILL). Whoever holds it knows that every temp or backup directory of NAME is stale, and removes it.
- SIGTERM is handled like Ctrl-C (cleanup, then exit 143); both are held back while the directories swap.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from stip.runtime.bundle_format import DEVELOPER_DIR, KEY_FILE, PARTS, not_a_bundle
from stip.runtime.errors import StipError

try:
    import fcntl
except ImportError:  # not POSIX: no lock, no stale-directory cleanup
    fcntl = None

DIR_MODE, FILE_MODE, PRIVATE_DIR_MODE, KEY_MODE = 0o755, 0o644, 0o700, 0o600


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so the same cleanup runs; the CLI exits 128 + 15."""

    exit_code = 128 + signal.SIGTERM


# ---- names next to the output ----

def _tmp_pattern(out: Path) -> re.Pattern:
    # ours: 16 hex digits; before this module, tempfile.mkdtemp's 8 characters (never a dot, so `.a.` never
    # matches the temp directories of an output named `a.b`)
    return re.compile(rf"^\.{re.escape(out.name)}\.([0-9a-f]{{16}}|[a-z0-9_]{{8}})\.stip-tmp$")


def backup_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.stip-old")


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.stip-lock")


def output_path(out_dir: str | Path) -> Path:
    """The absolute output path; refuses outputs that cannot be replaced as a whole (`-o .`, `-o ..`, `/`)."""
    out = Path(os.path.abspath(out_dir))
    cwd = Path.cwd()
    if out == cwd or out in cwd.parents:
        raise StipError(f"-o {out_dir}: is the current directory or contains it; stip compile writes a whole new "
                        "directory, so name one, e.g. -o bundle")
    return out


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse before compiling: an output that exists is replaced only with --force, and only if it is a bundle."""
    if out.is_symlink():
        raise StipError(f"{out}: is a symbolic link; give the directory it points to, or another -o")
    if out.exists() and not out.is_dir():
        raise StipError(f"{out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise StipError(f"{out}: already exists; pass --force to replace it (the old key will be lost)")
    why = not_a_bundle(out)
    if why:
        raise StipError(f"{out}: not a stip bundle ({why}); --force replaces only a bundle written by stip "
                        "compile, so choose another -o or empty the directory yourself")


# ---- one writer per output, and repair of what a dead writer left ----

@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the output's lock; a live writer's lock is one clear error, a dead writer's leftovers are repaired."""
    if fcntl is None:
        yield
        return
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise StipError(f"{out.parent}: cannot write the output there ({e.strerror})")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StipError(f"{out}: another stip compile (pid {holder}) is writing it; wait for it to finish")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else we locked a file its previous holder had just removed: take the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _recover(out)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _recover(out: Path) -> None:
    """With the lock held: put back a bundle that a crash between the two renames left as backup only, and
    remove every temp or backup directory of this output (their writers are dead)."""
    old = backup_path(out)
    if old.is_dir() and not old.is_symlink() and not out.exists():
        os.rename(old, out)
        _fsync_dir(out.parent)
    stale = [p for p in out.parent.iterdir() if _tmp_pattern(out).match(p.name) and _is_compile_tmp(p)]
    if old.is_dir() and not old.is_symlink():
        stale.append(old)
    for p in stale:
        shutil.rmtree(p)


def _is_compile_tmp(p: Path) -> bool:
    """A real directory holding nothing but bundle parts (not, say, an export-triton temp directory)."""
    return p.is_dir() and not p.is_symlink() and all(x.name in PARTS for x in p.iterdir())


def new_temp(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.stip-tmp")
    os.mkdir(tmp, PRIVATE_DIR_MODE)
    os.chmod(tmp, PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask, never widened: 0700 or less
    return tmp


# ---- modes, durability and the swap ----

def finish_temp(tmp: Path) -> None:
    """Explicit modes (dirs 0755, developer/ 0700, key 0600, files 0644), then fsync every file and directory.
    tmp itself stays 0700 until the swap, so no one else reads a half-written bundle."""
    for root, dirs, files in os.walk(tmp):
        for f in files:
            os.chmod(os.path.join(root, f), FILE_MODE)
        for d in dirs:
            os.chmod(os.path.join(root, d), DIR_MODE)
    dev = tmp / DEVELOPER_DIR
    if dev.is_dir():
        os.chmod(dev, PRIVATE_DIR_MODE)
        if (dev / KEY_FILE).is_file():
            os.chmod(dev / KEY_FILE, KEY_MODE)
    for root, dirs, files in os.walk(tmp, topdown=False):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(d: Path) -> None:
    if os.name == "nt":  # directories cannot be opened there; NTFS journals renames itself
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on a directory
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem can't."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_into_place(tmp: Path, out: Path) -> None:
    """tmp becomes out (mode 0755); the previous out, if any, is deleted. Ctrl-C and SIGTERM wait meanwhile."""
    os.chmod(tmp, DIR_MODE)
    _fsync_dir(tmp)
    with deferred_signals():
        if not out.exists():
            os.rename(tmp, out)
        elif _exchange(tmp, out):
            _fsync_dir(out.parent)
            shutil.rmtree(tmp)  # the previous bundle, now under the temp name
        else:
            old = backup_path(out)
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            _fsync_dir(out.parent)
            shutil.rmtree(old)
        _fsync_dir(out.parent)


# ---- signals ----

_deferred = [False]
_pending: list[int] = []


def _on_signal(signum: int, _frame) -> None:
    if _deferred[0]:
        _pending.append(signum)
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGINT raise (Terminated / KeyboardInterrupt) so `except BaseException` cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """A signal that arrives inside is raised when the block ends (whichever thread the OS delivered it to)."""
    _deferred[0] = True
    try:
        yield
    finally:
        _deferred[0] = False
        pending = _pending[:]
        _pending.clear()
    if pending:
        raise Terminated() if pending[0] == signal.SIGTERM else KeyboardInterrupt()
