"""Where a warm feature-cache read's time goes: every image of an MVTec-layout folder (the 15-class
benchmark's synthetic data) gets an entry of the row the benchmark's extractor stores (wide_resnet50_2,
D = 768, 224 px, random weights; with amp on a GPU its bfloat16 stage maps, else (28, 28, 768) float32)
in a scratch cache, then the run's read path (``FeatureSource._read``) and its parts are timed
(keys, reads without upload, bare reads, the XXH3-64 checksum, utime, host-to-device copies). Prints seconds and img/s.

Usage: ``[ROWS=features] python benchmarks/cache_read_breakdown.py DATA SCRATCH_CACHE_DIR`` (on a GPU
host; the CPU works, without the copies). The scratch folder is filled with 1.2 MB (GPU) or 2.4 MB per image: delete
it after.
"""
import os, sys, time
import xxhash
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import torch
from moleflow.data.loaders import load_class_split
from moleflow.data.dataset import AnomalyDataset
from moleflow.extractors.cache import FeatureCache
from moleflow.extractors import source as src
from moleflow.extractors.cnn_extractor import CNNPatchCoreExtractor

root = Path(sys.argv[1]); fc = Path(sys.argv[2])
sets = []
for c in sorted(p.name for p in root.iterdir() if p.is_dir()):
    split = load_class_split("mvtec", root, c)
    sets += [AnomalyDataset(split.train, 224), AnomalyDataset(split.test, 224)]
n = sum(len(d) for d in sets); print("images", n, "sets", len(sets))
cache = FeatureCache(fc, {"diag": 1}, 10**13, warn=print)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
extractor = CNNPatchCoreExtractor("wide_resnet50_2", 768, 224, weights="random", amp=True).to(dev)
extractor.store_maps = False if os.environ.get("ROWS") == "features" else None  # ROWS=features: float32 features
shape, dtype = extractor.stored_row(dev)
feat = torch.randn(*shape).to(dtype)
row_bytes = feat.numel() * feat.element_size()
t = time.perf_counter()
with ThreadPoolExecutor(16) as pool:
    jobs = []
    for d in sets:
        for s in d.samples:
            jobs.append(pool.submit(lambda s=s: cache.write(cache.key(s, 224, "crop"), feat, None)))
    [j.result() for j in jobs]
print(f"write {time.perf_counter()-t:.1f}s")

sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
PIN = torch.cuda.is_available()
source = src.FeatureSource(extractor, dev, 16, 0, cache=cache)
paths = []
def timed(name, fn, reps=2):
    for r in range(reps):
        sync(); t = time.perf_counter(); fn(); sync()
        dt = time.perf_counter() - t
    print(f"{name}: {dt:.2f}s ({n/dt:.0f} img/s)")
def full():
    for d in sets:
        patches = torch.empty(len(d), 28, 28, 768, device=dev)
        keys, found = source._read(d, patches, None)
        assert all(found)
timed("FeatureSource._read (run's path)", full)
allkeys = []
def keys():
    allkeys.clear()
    with ThreadPoolExecutor(16) as pool:
        for d in sets:
            allkeys.extend(k for k, _ in pool.map(lambda i, d=d: source._key(d, i), range(len(d))))
timed("keys + stat, 16 threads", keys)
timed("keys + stat, one thread (the run's path)", lambda: [source._key(d, i) for d in sets for i in range(len(d))])
for threads in (16, 32):
    host = torch.empty(256, *shape, dtype=dtype, pin_memory=PIN)
    def reads():
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: cache.read(allkeys[i], host[i % 256]), range(n)))
    timed(f"cache.read into pinned, {threads} threads, no upload", reads)
def raw():
    buf = [bytearray(row_bytes + 4096) for _ in range(16)]
    def one(i):
        with open(cache.path(allkeys[i]), "rb", buffering=0) as h:
            h.readinto(buf[i % 16])
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))
timed("raw readinto, 16 threads (no parse, no checksum)", raw)
blob = bytes(row_bytes)
def crc():
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: xxhash.xxh3_64_intdigest(blob), range(n)))
timed("xxh3_64 only, 16 threads", crc)
def touch():
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: os.utime(cache.path(allkeys[i])), range(n)))
timed("utime only, 16 threads", touch)
big = torch.empty(256, *shape, dtype=dtype, pin_memory=PIN); dst = torch.empty(256, *shape, dtype=dtype, device=dev)
timed("H2D of every entry's bytes in 256-row blocks", lambda: [dst.copy_(big) for _ in range(n // 256)])
