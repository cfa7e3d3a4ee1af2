"""Micro-benchmark of passes.permute.fold on one large 2-D weight (both axes permuted), fp32 and fp16.

Why: folding dominates `stip compile --no-check` on large models (issue 10); this times it alone, median of 5,
from an in-memory array and from a memory-mapped file (as a compile reads external data).
Run: python benchmarks/bench_fold.py [rows cols]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from stip.passes.permute import fold


class _Perms(SimpleNamespace):
    def vector(self, c: int) -> np.ndarray:
        return self.vectors[c]


def main(rows: int = 4096, cols: int = 11008, repeats: int = 5) -> None:
    rng = np.random.default_rng(0)
    perms = _Perms(solution=SimpleNamespace(dependent={}, permuted={0: "a", 1: "b"}),
                   vectors={0: rng.permutation(rows), 1: rng.permutation(cols)}, drawn={})
    for dtype in (np.float32, np.float16):
        w = rng.standard_normal((rows, cols), dtype=np.float32).astype(dtype)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "w.bin"
            w.tofile(path)
            for label, src in (("memory", w), ("memmap", np.memmap(path, dtype=dtype, mode="r", shape=w.shape))):
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    out = fold(src, [0, 1], perms)
                    times.append(time.perf_counter() - t0)
                    del out
                mb = w.nbytes / 2**20
                print(f"{np.dtype(dtype).name} [{rows}, {cols}] {label}: median {statistics.median(times):.3f} s "
                      f"({mb / statistics.median(times):.0f} MiB/s), min {min(times):.3f} s", flush=True)
            # Four such weights, one after the other and on the compiler's two fold threads.
            for threads in (1, 2):
                times = []
                with ThreadPoolExecutor(threads) as pool:
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        for out in pool.map(fold, [w] * 4, [[0, 1]] * 4, [perms] * 4):
                            del out
                        times.append(time.perf_counter() - t0)
                print(f"{np.dtype(dtype).name} 4 x [{rows}, {cols}] on {threads} thread(s): median "
                      f"{statistics.median(times):.3f} s", flush=True)


if __name__ == "__main__":
    main(*(int(x) for x in sys.argv[1:3]))
