"""Images decoded by worker processes, in order, while the caller runs the backbone.

PNG decoding holds Python's GIL between blocks, so threads do not scale with the cores; worker
processes do. They start once per process (``spawn``: they import PIL and numpy only, never torch
or CUDA) and stay for later datasets; each job decodes a chunk of files straight to the network's
size (``moleflow.data.decode``: the very function ``AnomalyDataset`` uses, so the pixels are the
same) and returns uint8 arrays, a quarter of the bytes of the float images. A few chunks are kept
in flight ahead of the one the caller is waiting for, so decoding and extraction overlap.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Iterator, Optional, Sequence

import numpy as np

from moleflow.data.base import Sample
from moleflow.data.decode import decode_chunk

MAX_WORKERS = 16
CHUNK = 16  # files per job: large enough that a job's overhead is small, small enough to balance

_pool: Optional[ProcessPoolExecutor] = None
_pool_size = 0


def available_cpus() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decode_workers(requested: int) -> int:
    """Worker processes for ``--num_workers requested``: that many, at most 16 (0: none, the images
    are decoded on a thread pool of this process while the backbone runs)."""
    return max(0, min(MAX_WORKERS, requested))


def shared_pool(workers: int) -> ProcessPoolExecutor:
    """The process's decoding pool of ``workers`` processes (made on first use, kept until exit)."""
    global _pool, _pool_size
    if _pool is None or _pool_size != workers:
        shutdown_pool()
        _pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        _pool_size = workers
    return _pool


def shutdown_pool() -> None:
    """Stop the decoding workers (also done at exit)."""
    global _pool, _pool_size
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
    _pool, _pool_size = None, 0


atexit.register(shutdown_pool)


def start_workers(workers: int) -> None:
    """Start the decoding workers now (they start in the background while the caller goes on)."""
    pool = shared_pool(workers)
    for _ in range(workers):
        pool.submit(int, 0)


def decoded_chunks(samples: Sequence[Sample], size: int, mode: str, workers: int,
                   chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, list[Optional[np.ndarray]]]]:
    """``decode_chunk`` results of ``samples`` in order, ``chunk`` files each, decoded by ``workers``
    processes with ``2 * workers`` chunks in flight (``workers`` 0: in this process).

    Raises:
        DataError: A file cannot be read or decoded (raised where its chunk is reached).
    """
    files = [(str(s.image_path), str(s.mask_path) if s.mask_path is not None else None) for s in samples]
    jobs = [files[i:i + chunk] for i in range(0, len(files), chunk)]
    if workers <= 0:
        for job in jobs:
            yield decode_chunk(job, size, mode)
        return
    pool = shared_pool(workers)
    pending: deque[Future] = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(decode_chunk, job, size, mode))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:  # the caller stopped early (an error): drop the rest
            future.cancel()
