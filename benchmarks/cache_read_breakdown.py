"""Where a warm feature-cache read's time goes: every image of an MVTec-layout folder (the 15-class
benchmark's synthetic data) gets an entry of the row the benchmark's extractor stores (wide_resnet50_2,
D = 768, 224 px, random weights; with amp on a GPU its bfloat16 stage maps, else (28, 28, 768) float32)
in a scratch cache (written by 4 threads, as a run's writers), then the run's read path
(``FeatureSource._read``) and its parts are timed: keys, index lookups, entry reads on 4-32 threads
without the upload, bare ``preadv`` of the segments, the XXH3-64 checksum, host-to-device copies.
Prints seconds and img/s.

Usage: ``[ROWS=features] PYTHONPATH=. python benchmarks/cache_read_breakdown.py DATA SCRATCH_CACHE_DIR`` (on a GPU
host; the CPU works, without the copies). The scratch folder is filled with 1.2 MB (GPU) or 2.4 MB per
image: delete it after.
"""
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash

from moleflow.data.dataset import AnomalyDataset
from moleflow.data.loaders import load_class_split
from moleflow.extractors import source as src
from moleflow.extractors.cache import FeatureCache
from moleflow.extractors.cache_files import segment_files
from moleflow.extractors.cnn_extractor import CNNPatchCoreExtractor

root, scratch = Path(sys.argv[1]), Path(sys.argv[2])
sets = []
for name in sorted(p.name for p in root.iterdir() if p.is_dir()):
    split = load_class_split("mvtec", root, name)
    sets += [AnomalyDataset(split.train, 224), AnomalyDataset(split.test, 224)]
n = sum(len(d) for d in sets)
print("images", n, "sets", len(sets))
cache = FeatureCache(scratch, {"diag": 1}, 10**13, warn=print)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
extractor = CNNPatchCoreExtractor("wide_resnet50_2", 768, 224, weights="random", amp=True).to(dev)
extractor.store_maps = False if os.environ.get("ROWS") == "features" else None  # ROWS=features: float32 features
shape, dtype = extractor.stored_row(dev)
row = torch.randn(*shape).to(dtype)
start = time.perf_counter()
with ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda s: cache.write(cache.key(s, 224, "crop"), row, None), [s for d in sets for s in d.samples]))
cache.trim()  # lets go of the written segments
print(f"write, 4 threads: {time.perf_counter() - start:.1f} s")

sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
pin = torch.cuda.is_available()
source = src.FeatureSource(extractor, dev, 16, 0, cache=cache)


def timed(name, fn, reps=2):
    for _ in range(reps):  # the last repetition is reported (the first warms the page cache)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        took = time.perf_counter() - start
    print(f"{name}: {took:.2f} s ({n / took:.0f} img/s)", flush=True)


def full():
    for d in sets:
        patches = torch.empty(len(d), 28, 28, 768, device=dev)
        keys, found = source._read(d, patches, None)
        assert all(found)


timed("FeatureSource._read (the run's path)", full)
keys = [source._key(d, i) for d in sets for i in range(len(d))]
timed("keys, one thread", lambda: [source._key(d, i) for d in sets for i in range(len(d))])
timed("index lookups", lambda: cache.locate(keys))
locations = cache.locate(keys)
host = torch.empty(256, *shape, dtype=dtype, pin_memory=pin)
for threads in (4, 16, 32):
    def reads():
        with ThreadPoolExecutor(threads) as pool:
            for block in range(0, n, 256):
                part = locations[block:block + 256]
                entries = cache.read_located([(loc, host[j], None) for j, loc in enumerate(part)], pool.submit)()
                assert all(e is not None for e in entries)
    timed(f"read_located into pinned, {threads} threads, no upload", reads)
segments = [path for path, _ in segment_files(scratch)]
buffers = [bytearray(16 << 20) for _ in range(16)]


def bare():
    def one(job):
        path, offset, i = job
        fd = os.open(path, os.O_RDONLY)
        try:
            os.preadv(fd, [buffers[i % 16]], offset)
        finally:
            os.close(fd)
    jobs = [(p, off, i) for i, (p, off) in enumerate((p, off) for p in segments
                                                    for off in range(0, os.path.getsize(p), 16 << 20))]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, jobs))


timed("bare preadv of the segments in 16 MB reads, 16 threads", bare)
blob = bytes(row.numel() * row.element_size())
with ThreadPoolExecutor(16) as pool:
    timed("XXH3-64 only, 16 threads", lambda: list(pool.map(lambda i: xxhash.xxh3_64_intdigest(blob), range(n))))
big = torch.empty(256, *shape, dtype=dtype, pin_memory=pin)
dst = torch.empty(256, *shape, dtype=dtype, device=dev)
timed("H2D of every entry's bytes in 256-row blocks", lambda: [dst.copy_(big) for _ in range(n // 256)])
