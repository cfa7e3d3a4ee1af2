"""KV-cache inputs and outputs: server-held state that stays in the permuted bases and never leaves the server.

Why a module: decoders exported by torch.onnx and optimum name the cache `past_key_values.{i}.key/value` in and
`present.{i}.key/value` out. The compiler must not pin those inputs (they carry permuted heads and head dims),
the client must never see them, and a cache input without its output is a broken graph worth one clear error.
"""

from __future__ import annotations

import re

from stip.passes.errors import StipError

_PAST = re.compile(r"^(past_key_values|past_key_value|past)([._].*)$")


def is_cache_input(name: str) -> bool:
    return bool(_PAST.match(name))


def is_cache_output(name: str) -> bool:
    return name.startswith("present")


def expected_output(name: str) -> str:
    m = _PAST.match(name)
    return "present" + m.group(2) if m else name


def pair_cache(inputs: list[str], outputs: list[str], where: str = "graph") -> list[tuple[str, str]]:
    """(cache input, cache output) pairs; raises StipError naming the first one that has no partner."""
    pairs = []
    for name in inputs:
        if not is_cache_input(name):
            continue
        want = expected_output(name)
        if want not in outputs:
            raise StipError(f"{where}: cache input '{name}' has no matching output '{want}' "
                            "(a decoder's cache inputs must pair with its present outputs)")
        pairs.append((name, want))
    paired = {o for _, o in pairs}
    for o in outputs:
        if is_cache_output(o) and o not in paired:
            raise StipError(f"{where}: cache output '{o}' has no matching input "
                            f"'{o.replace('present', 'past_key_values', 1)}'")
    return pairs
