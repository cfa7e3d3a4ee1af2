"""Input axis roles at run time: turn the manifest's roles into sizes, and check a user's inputs against them.

Why: the compiler reads each axis's role from the graph (stip.passes.axes) and records it in the client manifest,
so verify, run and generate size and check inputs the same way for every exporter's dim names, without the
original graph. Roles: "batch", "new" (tokens in this call), "past" (tokens the server's cache holds), "total"
(past + new), or an int (a size the model requires).
"""

from __future__ import annotations

import numpy as np

from stip.runtime.bundle_format import AXIS_ROLES
from stip.runtime.errors import StipError

Role = str | int
ROLES = AXIS_ROLES


def size(role: Role, batch: int, new: int, past: int) -> int:
    if isinstance(role, int):
        return role
    return {"batch": batch, "new": new, "past": past, "total": past + new}[role]


def shape(roles: list[Role], batch: int, new: int, past: int = 0) -> list[int]:
    return [size(r, batch, new, past) for r in roles]


def cache_past_axis(dims_in: list, dims_out: list) -> int | None:
    """The axis along which a cache grows: where the present's dim differs from the past's (HF: axis 2)."""
    for a, d in enumerate(dims_in):
        if a == 0 or isinstance(d, int):
            continue
        if a < len(dims_out) and dims_out[a] != d:
            return a
    symbolic = [a for a, d in enumerate(dims_in) if a > 0 and not isinstance(d, int)]
    return symbolic[0] if symbolic else None


def check_feeds(feeds: dict[str, np.ndarray], axes: dict[str, list[Role]], past: int = 0) -> None:
    """One clear StipError for inputs that cannot be this model's: wrong rank, a required size, or sizes that must
    agree (one batch, one new-token count, a total of past + new) but do not."""
    seen: dict[str, tuple[int, str, int]] = {}
    for name, roles in axes.items():
        if name not in feeds:
            continue
        got = np.shape(feeds[name])
        if len(got) != len(roles):
            raise StipError(f"input '{name}': shape {list(got)} has rank {len(got)}, the model expects rank "
                            f"{len(roles)} ({_describe(roles)})")
        for a, (n, r) in enumerate(zip(got, roles)):
            if isinstance(r, int):
                if n != r:
                    raise StipError(f"input '{name}': dim {a} is {n}, the model requires {r} ({_describe(roles)})")
                continue
            if r == "total":
                r, n = "new", n - past  # total = past + new: compare the new part
                if n < 0:
                    raise StipError(f"input '{name}': dim {a} is {got[a]}, shorter than the {past} cached tokens "
                                    f"it must cover ({_describe(roles)})")
            if r == "past":
                continue
            if r in seen and seen[r][0] != n:
                v, other, oa = seen[r]
                want = f"{past} cached + {v} new = {past + v}" if roles[a] == "total" else str(v)
                raise StipError(f"input '{name}' dim {a} is {got[a]}, but input '{other}' dim {oa} makes it "
                                f"{want} ({name}: {_describe(roles)})")
            seen.setdefault(r, (n, name, a))


def _describe(roles: list[Role]) -> str:
    return "[" + ", ".join(str(r) if isinstance(r, int) else r for r in roles) + "]"
