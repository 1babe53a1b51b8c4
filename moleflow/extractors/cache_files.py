"""The feature cache's files: the index, the segments, and their reads and writes.

The index, ``ROOT/index.sqlite``, says where each entry lies (backbone folder, segment, offset, bytes) and
when it was last used. SQLite keeps it whole under concurrent runs (a writer waits up to ``BUSY_S`` for
another). It runs in write-ahead-log mode where the file system allows it, with ``synchronous=NORMAL``: a
commit does not wait for the disk, and a killed run loses at most its last rows, never the index (their
entries' bytes are then dead space that compaction reclaims).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from torch import Tensor

INDEX = "index.sqlite"
DESCRIPTION = "backbone.json"
SEGMENT_SUFFIX = ".seg"
BUSY_S = 60.0  # how long a write waits for another run's
QUERY_KEYS = 500  # keys per lookup query (SQLite's limit on bound values is 999 in old builds)
RUN_BYTES = 16 << 20  # at most this many bytes of adjacent entries per read
RUN_ENTRIES = 300  # and at most this many entries (three buffers each; a vectored read takes 1,024)


@dataclass(frozen=True)
class Location:
    """Where an entry lies: ``ROOT/folder/segment`` from byte ``offset``, ``size`` bytes (head, row,
    mask of ``mask`` x ``mask`` bytes, 0 when none); ``used``: time of last use (seconds)."""

    key: str
    folder: str
    segment: str
    offset: int
    size: int
    mask: int
    used: float

    def path(self, root: Path) -> Path:
        return root / self.folder / self.segment


class CacheIndex:
    """The index of the cache at ``root`` (created when missing). Methods may be called from several
    threads (one connection, one lock; SQLite releases the GIL while it works)."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / INDEX
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=BUSY_S, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")  # stays the default journal where WAL cannot work
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, folder TEXT NOT NULL, "
                             "segment TEXT NOT NULL, offset INTEGER NOT NULL, size INTEGER NOT NULL, "
                             "mask INTEGER NOT NULL, used REAL NOT NULL)")
        except sqlite3.Error:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def locate(self, keys: Sequence[Optional[str]]) -> list[Optional[Location]]:
        """The location of each key (None: not in the cache, or the key is None)."""
        wanted = sorted({key for key in keys if key is not None})
        found: dict[str, Location] = {}
        with self._lock:
            for start in range(0, len(wanted), QUERY_KEYS):
                part = wanted[start:start + QUERY_KEYS]
                rows = self._db.execute(f"SELECT * FROM entries WHERE key IN ({','.join('?' * len(part))})", part)
                found.update((row[0], Location(*row)) for row in rows)
        return [found.get(key) if key is not None else None for key in keys]

    def add(self, location: Location) -> None:
        """Record an entry (replacing the key's earlier location, whose bytes become dead space)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", astuple(location))

    def remove(self, locations: Iterable[Location]) -> None:
        """Forget entries, each only if it is still where it was seen (another run may have rewritten it)."""
        self._many("DELETE FROM entries WHERE key = ? AND segment = ? AND offset = ?",
                   [(loc.key, loc.segment, loc.offset) for loc in locations])

    def move(self, moves: Iterable[tuple[Location, str, int]]) -> None:
        """Point entries at their copies (``(old location, new segment, new offset)``), each only if it is
        still where it was."""
        self._many("UPDATE entries SET segment = ?, offset = ? WHERE key = ? AND segment = ? AND offset = ?",
                   [(segment, offset, loc.key, loc.segment, loc.offset) for loc, segment, offset in moves])

    def touch(self, keys: Iterable[str], now: float) -> None:
        self._many("UPDATE entries SET used = ? WHERE key = ?", [(now, key) for key in keys])

    def entries(self) -> list[Location]:
        with self._lock:
            return [Location(*row) for row in self._db.execute("SELECT * FROM entries")]

    def _many(self, statement: str, rows: list[tuple]) -> None:
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(statement, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


def cache_entries(root: Path) -> list[Location]:
    """Every entry of the cache at ``root`` (none when it has no index)."""
    if not (Path(root) / INDEX).is_file():
        return []
    with contextlib.closing(CacheIndex(Path(root))) as index:
        return index.entries()


def backbone_folders(root: Path) -> list[Path]:
    """The backbone folders of a cache root (those holding a ``backbone.json``)."""
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and (p / DESCRIPTION).is_file())


def segment_files(root: Path) -> list[tuple[Path, os.stat_result]]:
    """Every segment file under ``root``'s backbone folders, with its stat (one gone meanwhile is left out)."""
    found = []
    for folder in backbone_folders(root):
        for item in os.scandir(folder):
            if item.name.endswith(SEGMENT_SUFFIX):
                try:
                    found.append((Path(item.path), item.stat()))
                except FileNotFoundError:
                    continue
    return found


def remove_old_format(root: Path) -> None:
    """Delete the entry folders of caches written before the segments (format 2 and older: a file per
    entry in ``<backbone>/<k[:2]>/``); their entries are never read (their keys differ)."""
    for folder in backbone_folders(root):
        for item in os.scandir(folder):
            if item.is_dir(follow_symlinks=False) and len(item.name) == 2:
                shutil.rmtree(item.path, ignore_errors=True)


def segment_bytes(root: Path) -> int:
    """The bytes of the cache's segments (live and dead entries): what its bound limits."""
    return sum(stat.st_size for _, stat in segment_files(root))


def disk_bytes(root: Path) -> int:
    """What the cache at ``root`` takes on disk: its segments and its index."""
    return segment_bytes(root) + sum(os.path.getsize(p) for p in Path(root).glob(f"{INDEX}*") if p.is_file())


@dataclass
class Segment:
    """A segment a cache appends to: ``end`` is where the next entry goes."""

    fd: int
    name: str
    end: int = 0


def runs(requests: list[tuple[int, Location, Tensor, Optional[Tensor]]]) -> list[list]:
    """``requests`` grouped into reads: entries adjacent in one segment, in file order, at most
    ``RUN_BYTES`` and ``RUN_ENTRIES`` per read."""
    grouped: list[list] = []
    size, previous = 0, None
    for request in sorted(requests, key=lambda r: (r[1].folder, r[1].segment, r[1].offset)):
        location = request[1]
        follows = previous is not None and ((location.folder, location.segment, location.offset)
                                            == (previous.folder, previous.segment, previous.offset + previous.size))
        if not follows or len(grouped[-1]) >= RUN_ENTRIES or size + location.size > RUN_BYTES:
            grouped.append([])
            size = 0
        grouped[-1].append(request)
        size += location.size
        previous = location
    return grouped


def new_segment(folder: Path) -> Segment:
    """A new, empty segment in ``folder``, held with a shared lock (no ``trim`` touches it meanwhile)."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}{SEGMENT_SUFFIX}"
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return Segment(fd, name)


def read_fully(fd: int, views: list[memoryview], offset: int) -> int:
    """Fill ``views`` one after the other from ``fd`` at ``offset`` (a read may return less than asked);
    bytes read (fewer at the end of the file)."""
    views, done = [view.cast("B") for view in views if len(view)], 0
    while views:
        got = os.preadv(fd, views, offset + done)
        if not got:
            break
        done += got
        views = _past(views, got)
    return done


def write_fully(fd: int, views: list[memoryview], offset: int) -> None:
    """Write ``views`` one after the other to ``fd`` at ``offset`` (a write may take less than given)."""
    views = [view.cast("B") for view in views if len(view)]
    while views:
        done = os.pwritev(fd, views, offset)
        offset += done
        views = _past(views, done)


def _past(views: list[memoryview], count: int) -> list[memoryview]:
    """What is left of ``views`` after their first ``count`` bytes."""
    while views and count >= len(views[0]):
        count -= len(views[0])
        views = views[1:]
    return [views[0][count:], *views[1:]] if views and count else views


def compact(path: Path, kept: list[Location], index: CacheIndex) -> int:
    """Rewrite segment ``path`` with only the entries ``kept`` (none: delete it); bytes freed (0 when a
    writer holds it or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a writer appends to it
            return 0
        size = os.fstat(fd).st_size
        written = 0
        if kept:
            copy = new_segment(path.parent)
            try:
                moves = []
                for location in sorted(kept, key=lambda location: location.offset):
                    data = os.pread(fd, location.size, location.offset)
                    write_fully(copy.fd, [memoryview(data)], copy.end)
                    moves.append((location, copy.name, copy.end))
                    copy.end += len(data)
                index.move(moves)
                written = copy.end
            finally:
                os.close(copy.fd)
        path.unlink(missing_ok=True)
        return size - written
    finally:
        os.close(fd)
