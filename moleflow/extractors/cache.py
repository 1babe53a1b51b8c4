"""The feature cache: the frozen backbone's output per image, kept on disk between runs.

An entry is one image: the extractor's stored row (``FeatureExtractor.stored``: the ``(H, W, D)`` float32
features, or, with ``amp`` on a GPU, a CNN's bfloat16 stage maps, half the bytes) and its resized mask if it
has one. Its key is the SHA-256 of everything that changes those bytes: the backbone's fingerprint (name,
weights hash, feature settings, ``D``, autocast, device type, torch version, what a row holds, images per
backbone call), the image size and resize mode, and the image's (and mask's) real path, size and mtime; a
changed file gets a new key, and its old entry ages out. Features of augmented images are never stored.

Layout (``cache_files.py``): ``ROOT/index.sqlite`` (where each entry lies, its last use),
``ROOT/<fingerprint>/backbone.json`` (what the fingerprint stands for) and ``ROOT/<fingerprint>/*.seg``
segments, each appended to by one run's cache under a shared ``flock``. An entry: a ``PREFIX``-byte head
(8-byte magic, 4-byte header length, JSON header: key, shape, dtype, mask side, XXH3-64 of the payload;
space-padded), the raw row, the uint8 mask. A run's entries lie one after the other, so a feature set is
read with a few large vectored reads.

Concurrent runs: an entry is indexed only once written, so no run sees half an entry; the same key written
twice keeps the later copy. An entry that does not check out (truncated, wrong key, layout or checksum) is
forgotten and recomputed with a warning. A read refreshes an entry's time when older than ``TOUCH_S``. Past
``max_bytes``, ``trim`` forgets the least recently used entries and rewrites the segments holding dead bytes
(forgotten or replaced entries, a killed writer's tail); a segment some writer holds is left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import struct
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISLNK
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import xxhash
from torch import Tensor, nn

from moleflow.data.base import Sample
from moleflow.extractors.cache_files import (DESCRIPTION, INDEX, CacheIndex, Location, Segment, compact, new_segment,
                                             read_fully, remove_old_format, runs, segment_bytes, segment_files,
                                             write_fully)

FORMAT = 3  # 3: segments and an index (2: a file per entry, XXH3-64; 1: CRC-32)
MAGIC = b"MFFEAT03"
PREFIX = 256  # bytes of an entry's head: magic, header length, JSON header, padding
ENV_VAR = "MOLEFLOW_CACHE_DIR"
SEGMENT_BYTES = 1 << 30  # a writer starts a new segment past this
STALE_S = 3600.0  # a segment no writer holds, without entries and unchanged this long, was a killed writer's
TOUCH_S = 600.0  # a read entry's time is refreshed when older than this (the eviction order's grain)
Request = tuple[Location, Tensor, Optional[Tensor]]  # where an entry lies, its row's place, its mask's place


def default_cache_dir() -> Path:
    """``$MOLEFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/moleflow/features``, else ``~/.cache/moleflow/features``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "moleflow" / "features"


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes), on whatever device it is."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()


class _Identities:
    """``[real path, size, mtime_ns]`` of image files, with one ``lstat`` per file: each folder's real
    path is resolved once (a file that is itself a link is resolved in full)."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    def __call__(self, path: str) -> list[Any]:
        full = os.path.abspath(path)
        folder, name = os.path.split(full)
        stat = os.lstat(full)
        if S_ISLNK(stat.st_mode):
            real = os.path.realpath(path)
            stat = os.stat(real)
        else:
            if folder not in self._folders:
                self._folders[folder] = os.path.realpath(folder)
            real = os.path.join(self._folders[folder], name)
        return [real, stat.st_size, stat.st_mtime_ns]


def _bytes(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor of any dtype, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")


def _checksum(*parts: Any) -> int:
    """XXH3-64 of the bytes-like ``parts`` one after the other (releases the GIL on large parts)."""
    digest = xxhash.xxh3_64()
    for data in parts:
        if len(data):
            digest.update(data)
    return digest.intdigest()


@dataclass
class Entry:
    """A cache entry read back: its row (see ``FeatureCache.read``) and the mask ``(S, S)`` uint8 or None."""

    patches: Tensor
    mask: Optional[Tensor]


def _at_once(fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` run now, as a finished ``Future`` (``read_located``'s default ``submit``)."""
    done: Future = Future()
    done.set_result(fn(*args))
    return done


class FeatureCache:
    """Per-image backbone outputs under ``root`` for one backbone ``identity``.

    Args:
        root: the cache folder (shared by every backbone and run).
        identity: what makes the backbone's output (JSON-able; ``weights_digest`` among it).
        max_bytes: the size the whole folder is brought under after a run stored new entries.
        warn: where a corrupt entry or a failed write is reported (one line each).
    """

    def __init__(self, root: Path, identity: dict[str, Any], max_bytes: int,
                 warn: Callable[[str], None]) -> None:
        self.root = Path(root)
        self.fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = self.root / self.fingerprint
        self.max_bytes = max_bytes
        self.warn = warn
        self.writable = True
        self._identity = _Identities()
        self._segments: list[Segment] = []  # this cache's, the last one being appended to
        self._segment_lock = threading.Lock()
        self.folder.mkdir(parents=True, exist_ok=True)  # OSError: the caller says what to do
        description = self.folder / DESCRIPTION
        if not description.is_file():
            _atomic_write(description, json.dumps({"format": FORMAT, **identity}, indent=1).encode())
        tempfile.NamedTemporaryFile(dir=self.folder, prefix=".probe", delete=True).close()  # OSError: not writable
        self.index = self._open_index()

    def _open_index(self) -> CacheIndex:
        try:
            return CacheIndex(self.root)
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError):  # locked, read-only, no space: not damage
                raise OSError(f"{self.root / INDEX}: {error}") from error
            self.warn(f"warning: the feature cache index {self.root / INDEX} is unreadable ({error}); it starts "
                      "empty (the old segments are deleted once stale)")
            for path in self.root.glob(f"{INDEX}*"):
                path.unlink(missing_ok=True)
            return CacheIndex(self.root)

    def key(self, sample: Sample, img_size: int, resize_mode: str) -> str:
        """The entry name of ``sample`` at ``img_size`` / ``resize_mode`` (OSError: file not readable)."""
        parts = {"format": FORMAT, "backbone": self.fingerprint, "img_size": img_size, "resize_mode": resize_mode,
                 "image": self._identity(str(sample.image_path)),
                 "mask": self._identity(str(sample.mask_path)) if sample.mask_path is not None else None}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def locate(self, keys: Sequence[Optional[str]]) -> list[Optional[Location]]:
        """Where each key's entry lies (None: not in the cache)."""
        return self.index.locate(keys)

    def read(self, key: str, out: Tensor, mask: Optional[Tensor] = None) -> Optional[Entry]:
        """The entry ``key`` read into ``out`` (and ``mask``; see ``read_located``), or None."""
        (location,) = self.locate([key])
        return self.read_located([(location, out, mask)])()[0] if location is not None else None

    def read_located(self, requests: Sequence[Request],
                     submit: Callable[..., Future] = _at_once) -> Callable[[], list[Optional[Entry]]]:
        """Start reading entries; returns a function that waits for them and gives them in order.

        Args:
            requests: per entry, its location, the CPU contiguous row its row is read into (shape and
                dtype the entry's) and where its mask goes (contiguous uint8 of its size) or None (then
                a mask is read on its own). A mask place is left unspecified after a corrupt entry.
            submit: runs a read, e.g. a thread pool's ``submit`` (default: at once, in this thread).
                Entries lying one after the other in a segment are read together (``RUN_BYTES``); the
                reads and checksums release the GIL.

        An entry gone meanwhile (its segment compacted or cleared by another run) is None; a corrupt one
        is None, reported and forgotten.
        """
        reads = runs([(i, *request) for i, request in enumerate(requests)])
        jobs = [submit(self._read_run, run) for run in reads]

        def wait() -> list[Optional[Entry]]:
            entries: list[Optional[Entry]] = [None] * len(requests)
            corrupt = []
            for job in jobs:
                for i, got in job.result():
                    if isinstance(got, str):
                        location = requests[i][0]
                        corrupt.append(location)
                        self.warn(f"warning: feature cache entry {location.key[:16]}… in {location.path(self.root)} "
                                  f"is corrupt ({got}); forgotten, the image is extracted again")
                    else:
                        entries[i] = got
            now = time.time()
            old = [loc.key for (loc, _, _), entry in zip(requests, entries) 
                   if entry is not None and now - loc.used > TOUCH_S]
            try:
                self.index.remove(corrupt)
                self.index.touch(old, now)
            except sqlite3.Error:  # a busy or read-only index: the times only order eviction
                pass
            return entries
        return wait

    def _read_run(self, run: list[tuple[int, Location, Tensor, Optional[Tensor]]]) -> list[tuple[int, Any]]:
        """Read entries lying one after the other with one vectored read: per entry, (its request number,
        its ``Entry``, or why it is corrupt, or None when its segment is gone)."""
        first = run[0][1]
        try:
            fd = os.open(first.path(self.root), os.O_RDONLY)
        except FileNotFoundError:
            return [(i, None) for i, *_ in run]
        try:
            planned, views = [], []
            for i, location, out, place in run:
                side, features = location.mask, _bytes(out)
                if location.size != PREFIX + len(features) + side * side:  # another layout: its head says which
                    head, features, mask = bytearray(location.size), None, None
                else:
                    head = bytearray(PREFIX)
                    fits = place is not None and place.numel() == side * side
                    mask = (place if fits else torch.empty(side * side, dtype=torch.uint8)) if side else None
                spot = _bytes(mask) if mask is not None else memoryview(b"")
                planned.append((i, location, out, head, features, mask, spot))
                views += [view for view in (memoryview(head), features, spot) if view is not None and len(view)]
            done = read_fully(fd, views, first.offset)
        finally:
            os.close(fd)
        results, end = [], first.offset
        for i, location, out, head, features, mask, spot in planned:
            end += location.size
            try:
                if end - first.offset > done:
                    raise ValueError("truncated")
                header = _parse_head(head, location.key)
                if tuple(header["shape"]) != tuple(out.shape) or header["dtype"] != dtype_name(out.dtype):
                    raise ValueError(f"{header['dtype']} rows of shape {tuple(header['shape'])}, expected "
                                     f"{dtype_name(out.dtype)} {tuple(out.shape)}")
                if features is None or (header["mask"] or 0) != location.mask:
                    raise ValueError(f"{location.size} bytes with a mask of side {header['mask']}, the index says "
                                     f"a mask of side {location.mask}")
                if _checksum(features, spot) != header["xxh3"]:
                    raise ValueError("checksum mismatch")
            except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as error:
                results.append((i, str(error)))
                continue
            results.append((i, Entry(out, mask.view(location.mask, -1) if mask is not None else None)))
        return results

    def write(self, key: str, patches: Tensor, mask: Optional[Tensor]) -> None:
        """Store the row ``patches`` (any shape and dtype) and ``mask`` ``(S, S)`` uint8 or None as entry
        ``key``: appended to this cache's segment, then indexed (a failed write is reported once and turns
        writing off for this cache). Safe from several threads."""
        if not self.writable:
            return
        row = patches.detach().cpu().contiguous()
        features = _bytes(row)  # no copy on the CPU
        mask_bytes = b"" if mask is None else mask.cpu().contiguous().numpy().astype(np.uint8).tobytes()
        side = int(mask.shape[-1]) if mask is not None else 0
        header = json.dumps({"key": key, "shape": list(row.shape), "dtype": dtype_name(row.dtype),
                             "mask": side or None, "xxh3": _checksum(features, mask_bytes)}).encode()
        head = MAGIC + struct.pack("<I", len(header)) + header
        if len(head) > PREFIX:
            raise ValueError(f"a feature cache header of {len(head)} bytes does not fit in {PREFIX}")
        size = PREFIX + len(features) + len(mask_bytes)
        try:
            segment, offset = self._reserve(size)
            write_fully(segment.fd, [memoryview(head.ljust(PREFIX, b" ")), features, memoryview(mask_bytes)],
                         offset)
            self.index.add(Location(key, self.fingerprint, segment.name, offset, size, side, time.time()))
        except (OSError, sqlite3.Error) as error:
            self.writable = False
            self.warn(f"warning: cannot write to the feature cache {self.folder} ({error}); this run stores no more "
                      f"features there (free space, or pass --feature_cache DIR or --no_feature_cache)")

    def _reserve(self, size: int) -> tuple[Segment, int]:
        """The segment and offset where an entry of ``size`` bytes goes (a new segment past ``SEGMENT_BYTES``)."""
        with self._segment_lock:
            if not self._segments or (self._segments[-1].end and self._segments[-1].end + size > SEGMENT_BYTES):
                self._segments.append(new_segment(self.folder))
            segment = self._segments[-1]
            offset, segment.end = segment.end, segment.end + size
            return segment, offset

    def trim(self) -> int:
        """Bring the cache's segments under ``max_bytes`` (module docstring); returns their bytes. Call it with
        none of this cache's writes in flight: it first lets go of its segments. Also deletes an older format's
        files and killed writers' segments (no entries, unchanged for ``STALE_S``). A busy index or a failed
        rewrite is reported; the cache stays usable."""
        with self._segment_lock:
            for segment in self._segments:
                os.close(segment.fd)
            self._segments = []
        try:
            return self._trim()
        except (OSError, sqlite3.Error) as error:
            self.warn(f"warning: the feature cache {self.root} could not be brought under its bound ({error}); "
                      "the next run tries again")
            return segment_bytes(self.root)

    def _trim(self) -> int:
        remove_old_format(self.root)
        entries = self.index.entries()
        total = segment_bytes(self.root)
        if total > self.max_bytes:
            live = sum(location.size for location in entries)
            entries.sort(key=lambda location: location.used)  # oldest first
            evicted = 0
            while evicted < len(entries) and live > self.max_bytes:
                live -= entries[evicted].size
                evicted += 1
            self.index.remove(entries[:evicted])
            entries = entries[evicted:]
        held: dict[tuple[str, str], list[Location]] = defaultdict(list)
        for location in entries:
            held[location.folder, location.segment].append(location)
        now, candidates = time.time(), []
        for path, stat in segment_files(self.root):
            kept = held.get((path.parent.name, path.name), [])
            dead = stat.st_size - sum(location.size for location in kept)
            orphan = not kept and now - stat.st_mtime > STALE_S
            if orphan or (dead > 0 and total > self.max_bytes):
                candidates.append((dead, path, kept))
        for dead, path, kept in sorted(candidates, key=lambda c: -c[0]):
            if total <= self.max_bytes and kept:
                break
            total -= compact(path, kept, self.index)
        return total


def _parse_head(head: bytearray, key: str) -> dict:
    """The JSON header at the start of an entry; ValueError when it does not check out."""
    if len(head) < 12 or head[:8] != MAGIC:
        raise ValueError("not a feature cache entry")
    (length,) = struct.unpack("<I", head[8:12])
    if 12 + length > min(len(head), PREFIX):
        raise ValueError("truncated header")
    header = json.loads(bytes(head[12:12 + length]).decode())
    if header["key"] != key:
        raise ValueError("its key does not match its name")
    return header


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
