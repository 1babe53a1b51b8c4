"""Whether reading many cache-entry-sized files costs per file or per byte on this host.

Writes 5,325 files (the 15-task benchmark's image count) of 1.2 MB and of 2.4 MB (the cache's entry
sizes with and without ``--amp`` maps) under each folder given, then times, on thread pools: the
cache's own entry writes (``_atomic_write``, 4 threads, as the run's writers), ``stat``,
open + close, open + ``readv`` + close (1-32 threads), XXH3-64 and a bytes copy of the same amounts,
and ``preadv`` of the same bytes from one big file. Prints seconds and files/s; deletes what it wrote.

Usage: ``PYTHONPATH=. python benchmarks/file_read_cost.py /tmp/probe /dev/shm/probe`` (needs about 13 GB free per
folder, one folder at a time).
"""
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

from moleflow.extractors.cache import _atomic_write

FILES = 5325
SIZES = (1204224, 2408448)  # bytes of a bfloat16-maps entry and of a float32-features entry


def timed(name: str, fn, reps: int = 2) -> None:
    for _ in range(reps):  # the last repetition is reported (the first warms the page cache)
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
    print(f"  {name}: {took:.3f} s ({FILES / took:.0f} files/s)", flush=True)


def write_files(root: str, size: int) -> list[str]:
    blob, paths = np.random.bytes(size), []
    for i in range(FILES):
        folder = os.path.join(root, f"{i % 256:02x}")
        os.makedirs(folder, exist_ok=True)
        paths.append(os.path.join(folder, f"{i:064x}.feat"))
        with open(paths[-1], "wb") as handle:
            handle.write(blob)
    return paths


def measure(root: str, size: int) -> None:
    start = time.perf_counter()
    paths = write_files(root, size)
    print(f"{root}: {FILES} files of {size / 1e6:.1f} MB written in {time.perf_counter() - start:.1f} s", flush=True)
    head, body = bytes(256), np.random.bytes(size - 256)
    entries = [f"{path}.entry" for path in paths]
    with ThreadPoolExecutor(4) as pool:
        timed("entry writes (_atomic_write), 4 threads",
              lambda: list(pool.map(lambda e: _atomic_write(Path(e), head, body, b""), entries)))
    for entry in entries:
        os.remove(entry)
    buffers = [bytearray(size) for _ in range(64)]
    sources = [bytearray(np.random.bytes(size)) for _ in range(64)]

    def read(i: int) -> None:
        fd = os.open(paths[i], os.O_RDONLY)
        try:
            os.readv(fd, [buffers[i % 64]])
        finally:
            os.close(fd)

    def checksum(i: int) -> None:
        digest = xxhash.xxh3_64()
        digest.update(sources[i % 64])
        digest.intdigest()

    def copy(i: int) -> None:
        buffers[i % 64][:] = sources[(i + 1) % 64]

    with ThreadPoolExecutor(16) as pool:
        timed("stat, 16 threads", lambda: list(pool.map(os.stat, paths)))
        timed("open + close, 16 threads", lambda: list(pool.map(lambda p: os.close(os.open(p, os.O_RDONLY)), paths)))
    for threads in (1, 4, 8, 16, 32):
        with ThreadPoolExecutor(threads) as pool:
            timed(f"open + readv + close, {threads} threads", lambda: list(pool.map(read, range(FILES))))
    for threads in (1, 16):
        with ThreadPoolExecutor(threads) as pool:
            timed(f"XXH3-64 of the same bytes, {threads} threads", lambda: list(pool.map(checksum, range(FILES))))
            timed(f"bytes copy of the same bytes, {threads} threads", lambda: list(pool.map(copy, range(FILES))))
    big = os.path.join(root, "big.bin")
    with open(big, "wb") as handle:
        for path in paths:
            with open(path, "rb") as part:
                handle.write(part.read())
    fd = os.open(big, os.O_RDONLY)
    try:
        for threads in (4, 16):
            with ThreadPoolExecutor(threads) as pool:
                timed(f"one big file, preadv per entry, {threads} threads",
                      lambda: list(pool.map(lambda i: os.preadv(fd, [buffers[i % 64]], i * size), range(FILES))))
    finally:
        os.close(fd)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        for entry_size in SIZES:
            measure(folder, entry_size)
