"""Constants whose stored layout is not their logical one: 4-bit values packed two to a byte, block tables
flattened to one axis (MatMulNBits' weights, scales and zero points).

Why: the solver relates the axes of the logical view (rows x blocks x values in a block); folding unpacks the
stored bytes into that view, permutes it like any constant, and packs it back. Moving 4-bit values is pure data
movement, so the result is bit-exact; padding nibbles (an odd number of blocks) stay where they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Packing:
    """`shape`: the logical view, whose first axis is the stored tensor's first axis (N); `bits`: bits per value
    in a stored byte (8: whole bytes, only reshaped; 4: two values per byte, the low nibble first)."""

    shape: tuple[int, ...]
    bits: int = 8

    def unpack(self, stored: np.ndarray) -> np.ndarray:
        rows = stored.reshape(self.shape[0], -1)
        if self.bits == 8 or stored.dtype != np.uint8:
            return rows.reshape(self.shape)
        values = _nibbles(rows)
        return np.ascontiguousarray(values[:, :int(np.prod(self.shape[1:]))]).reshape(self.shape)

    def pack(self, view: np.ndarray, stored: np.ndarray) -> np.ndarray:
        """The view in the stored layout; a padding nibble keeps the stored tensor's value."""
        if self.bits == 8 or stored.dtype != np.uint8:
            return np.ascontiguousarray(view).reshape(stored.shape)
        values = _nibbles(stored.reshape(self.shape[0], -1))
        values[:, :int(np.prod(self.shape[1:]))] = view.reshape(self.shape[0], -1)
        return ((values[:, 1::2] << 4) | values[:, 0::2]).astype(np.uint8).reshape(stored.shape)


def _nibbles(rows: np.ndarray) -> np.ndarray:
    """[R, bytes] -> [R, 2 * bytes] 4-bit values, each byte's low nibble first (onnxruntime's order)."""
    out = np.empty((rows.shape[0], rows.shape[1] * 2), np.uint8)
    out[:, 0::2] = rows & 0x0F
    out[:, 1::2] = rows >> 4
    return out
