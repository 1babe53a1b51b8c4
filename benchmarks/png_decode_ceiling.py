"""How fast this host decodes the benchmark's PNGs: the run's decode (``read_rgb_resized``) and the
bare decode, on one core, on 16 and 32 threads and in 16 processes. Prints images/s.

Usage: ``python benchmarks/png_decode_ceiling.py DATA [SIZE]`` with DATA the benchmark's synthetic
data folder (``python -m moleflow.benchmark --weights random --data_path DATA --skip_run --skip_limits``)
or any MVTec-layout folder; SIZE the network's input side (default 256).
"""

from __future__ import annotations

import glob
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from PIL import Image

from moleflow.data.decode import read_rgb_resized

SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 256


def resized(path: str) -> int:
    read_rgb_resized(path, SIZE, "crop")
    return 0


def bare(path: str) -> int:
    with Image.open(path) as image:
        image.load()
    return 0


def main() -> None:
    files = sorted(glob.glob(os.path.join(sys.argv[1], "*", "train", "good", "*.png")))[::7][:480]
    if not files:
        sys.exit(f"error: no PNG under {sys.argv[1]}/*/train/good/ (pass the benchmark's data folder)")
    print(f"{len(os.sched_getaffinity(0))} CPUs, {len(files)} files, size {SIZE}")
    for name, decode in (("decode + resize", resized), ("decode only", bare)):
        few = files[:80]
        start = time.perf_counter()
        for path in few:
            decode(path)
        seconds = time.perf_counter() - start
        print(f"{name}: 1 thread {len(few) / seconds:.0f} img/s ({1e3 * seconds / len(few):.1f} ms/img)")
        for threads in (16, 32):
            with ThreadPoolExecutor(threads) as pool:
                start = time.perf_counter()
                list(pool.map(decode, files))
                print(f"{name}: {threads} threads {len(files) / (time.perf_counter() - start):.0f} img/s")
        with ProcessPoolExecutor(16) as pool:
            list(pool.map(decode, files[:32]))  # workers started
            start = time.perf_counter()
            list(pool.map(decode, files, chunksize=8))
            print(f"{name}: 16 processes {len(files) / (time.perf_counter() - start):.0f} img/s")


if __name__ == "__main__":
    main()
