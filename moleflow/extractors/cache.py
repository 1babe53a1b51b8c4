"""The feature cache: the frozen backbone's output per image, kept on disk between runs.

An entry is one image: the extractor's stored row (``FeatureExtractor.stored``: the patch features
``(H, W, D)`` float32, or, with ``amp`` on a GPU, a CNN's bfloat16 stage maps, half the bytes, which
``from_stored`` pools), and its resized ground-truth mask when the image has one. Its name is the
SHA-256 of everything that changes those bytes: the backbone's fingerprint (name, a hash of its
weights, the feature settings, ``D``, autocast, device type, torch version, what a row holds, the
images per backbone call), the image size and resize mode, and the image's (and mask's) absolute
path, size and modification time. A file that changed has a new
key, so its old entry is never found again (and ages out). Features of augmented images are never
stored.

Layout: ``ROOT/<fingerprint>/backbone.json`` (what the fingerprint stands for) and
``ROOT/<fingerprint>/<k[:2]>/<k>.feat``. A file: a ``PREFIX``-byte head (8-byte magic, 4-byte header
length, a JSON header: key, shape, dtype, XXH3-64 checksum of the payload; padded with spaces), then
the raw row and the uint8 mask. The fixed head lets one vectored read fill it and the features.
Entries are written to a temporary file and renamed into place, so concurrent runs never see half an
entry; an entry that does not check out (truncated, wrong key, wrong checksum) is deleted and
recomputed with a warning. Reading an entry refreshes its time when it is older than ``TOUCH_S``;
past ``max_bytes`` the least recently used go.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISLNK
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import xxhash
from torch import Tensor, nn

from moleflow.data.base import Sample

FORMAT = 2  # 2: XXH3-64 checksums (1: CRC-32)
MAGIC = b"MFFEAT02"
PREFIX = 256  # bytes of the head: magic, header length, JSON header, padding
SUFFIX = ".feat"
DESCRIPTION = "backbone.json"
ENV_VAR = "MOLEFLOW_CACHE_DIR"
STALE_TEMP_S = 3600.0  # a temporary file older than this was left by a killed writer
TOUCH_S = 600.0  # a read entry's time is refreshed when older than this (the eviction order's grain)


def default_cache_dir() -> Path:
    """``$MOLEFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/moleflow/features``, else
    ``~/.cache/moleflow/features``."""
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
    """What a cache entry gives back: its row (see ``FeatureCache.read``) and the mask ``(S, S)`` uint8 or
    None."""

    patches: Tensor
    mask: Optional[Tensor]


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
        self.identity = identity
        self.fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = self.root / self.fingerprint
        self.max_bytes = max_bytes
        self.warn = warn
        self.writable = True
        self._identity = _Identities()
        self.folder.mkdir(parents=True, exist_ok=True)  # OSError: the caller says what to do
        description = self.folder / DESCRIPTION
        if not description.is_file():
            _atomic_write(description, json.dumps({"format": FORMAT, **identity}, indent=1).encode())
        probe = tempfile.NamedTemporaryFile(dir=self.folder, prefix=".probe", delete=True)
        probe.close()

    def key(self, sample: Sample, img_size: int, resize_mode: str) -> str:
        """The entry name of ``sample`` at ``img_size`` / ``resize_mode`` (OSError: file not readable)."""
        parts = {"format": FORMAT, "backbone": self.fingerprint, "img_size": img_size, "resize_mode": resize_mode,
                 "image": self._identity(str(sample.image_path)),
                 "mask": self._identity(str(sample.mask_path)) if sample.mask_path is not None else None}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}{SUFFIX}"

    def read(self, key: str, out: Tensor, mask: Optional[Tensor] = None,
             modified: Optional[float] = None) -> Optional[Entry]:
        """The entry ``key`` with its row read into ``out`` (CPU, contiguous; its shape and dtype must be
        the entry's), or None when absent; a corrupt entry is deleted, reported and None.

        Args:
            mask: where the entry's mask goes (contiguous uint8) when it has one of that size; else a
                mask is read on its own. Left unspecified after a corrupt entry.
            modified: the entry's modification time when the caller has it (else it is asked).

        One vectored read fills the head, ``out`` and ``mask`` (no intermediate copies); reading and the
        checksum release the GIL, so threads read in parallel.
        """
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                head, extra = bytearray(PREFIX), bytearray(1)  # one byte more shows trailing data
                features = _bytes(out)
                spot = _bytes(mask) if mask is not None else memoryview(extra)[:0]
                done = _read_fully(fd, [memoryview(head), features, spot, memoryview(extra)])
                header = _parse_head(head, done, key)
                if tuple(header["shape"]) != tuple(out.shape) or header["dtype"] != dtype_name(out.dtype):
                    raise ValueError(f"{header['dtype']} rows of shape {tuple(header['shape'])}, expected "
                                     f"{dtype_name(out.dtype)} {tuple(out.shape)}")
                side = header["mask"] or 0
                after = done - PREFIX - len(features)  # bytes read after the features
                if after < 0:
                    raise ValueError("truncated features")
                if side and side * side != len(spot):  # no place of that size: the mask read on its own
                    spot, mask = memoryview(os.pread(fd, side * side + 1, PREFIX + len(features))), None
                    after = len(spot)
                if after != side * side:
                    raise ValueError(f"{after} mask bytes, expected {side * side}")
                if _checksum(features, spot[:after]) != header["xxh3"]:
                    raise ValueError("checksum mismatch")
                stale = time.time() - (os.fstat(fd).st_mtime if modified is None else modified) > TOUCH_S
            finally:
                os.close(fd)
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as error:
            self.warn(f"warning: feature cache entry {path} is corrupt ({error}); deleted, the image is extracted again")
            _remove(path)
            return None
        if stale:
            _touch(path)
        if side and mask is None:
            mask = torch.frombuffer(bytearray(spot), dtype=torch.uint8)
        return Entry(out, mask.view(side, side) if side else None)

    def write(self, key: str, patches: Tensor, mask: Optional[Tensor]) -> None:
        """Store the row ``patches`` (any shape and dtype) and ``mask`` ``(S, S)`` uint8 or None as entry ``key``
        (atomically; a failed write is reported once and turns writing off for this cache)."""
        if not self.writable:
            return
        row = patches.detach().cpu().contiguous()
        features = _bytes(row)  # no copy on the CPU
        mask_bytes = b"" if mask is None else mask.cpu().contiguous().numpy().astype(np.uint8).tobytes()
        header = json.dumps({"key": key, "shape": list(row.shape), "dtype": dtype_name(row.dtype),
                             "mask": int(mask.shape[-1]) if mask is not None else None,
                             "xxh3": _checksum(features, mask_bytes)}).encode()
        head = MAGIC + struct.pack("<I", len(header)) + header
        if len(head) > PREFIX:
            raise ValueError(f"a feature cache header of {len(head)} bytes does not fit in {PREFIX}")
        try:
            _atomic_write(self.path(key), head.ljust(PREFIX, b" "), features, mask_bytes)
        except OSError as error:
            self.writable = False
            self.warn(f"warning: cannot write to the feature cache {self.folder} ({error}); this run stores no more "
                      f"features there (free space, or pass --feature_cache DIR or --no_feature_cache)")

    def trim(self) -> int:
        """Delete temporary files left by killed writers (older than ``STALE_TEMP_S``), then the least
        recently used entries until the folder is under ``max_bytes``; returns its size."""
        remove_stale_temps(self.root)
        entries = sorted(cache_entries(self.root), key=lambda e: e[1])  # oldest first
        total = sum(size for _, _, size in entries)
        for path, _, size in entries:
            if total <= self.max_bytes:
                break
            _remove(path)
            total -= size
        return total


def cache_entries(root: Path) -> list[tuple[Path, float, int]]:
    """Every entry under ``root``: (path, time of last use, bytes)."""
    return [(path, stat.st_mtime, stat.st_size) for path, stat in _files(root, lambda name: name.endswith(SUFFIX))]


def remove_stale_temps(root: Path) -> None:
    """Delete the temporary files under ``root`` that no writer has touched for ``STALE_TEMP_S`` (a run
    killed mid-write leaves one)."""
    limit = time.time() - STALE_TEMP_S
    for path, stat in _files(root, lambda name: name.startswith(".") and name.endswith(".tmp")):
        if stat.st_mtime < limit:
            _remove(path)


def _files(root: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[Path, os.stat_result]]:
    """The files in the entry folders of ``root``'s backbone folders whose name is ``wanted``, with their
    stat (a file gone meanwhile, deleted or renamed by another run, is left out)."""
    for folder in backbone_folders(root):
        for sub in os.scandir(folder):
            if not sub.is_dir():
                continue
            for item in os.scandir(sub.path):
                if wanted(item.name):
                    try:
                        yield Path(item.path), item.stat()
                    except FileNotFoundError:
                        continue


def backbone_folders(root: Path) -> list[Path]:
    """The backbone folders of a cache root (those holding a ``backbone.json``)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / DESCRIPTION).is_file())


def _parse_head(head: bytearray, got: int, key: str) -> dict:
    """The JSON header in an entry's head (``got`` bytes of the file were read); ValueError when it
    does not check out."""
    if got < 12 or head[:8] != MAGIC:
        raise ValueError("not a feature cache entry")
    (length,) = struct.unpack("<I", head[8:12])
    if 12 + length > min(got, PREFIX):
        raise ValueError("truncated header")
    header = json.loads(head[12:12 + length].decode())
    if header["key"] != key:
        raise ValueError("its key does not match its name")
    return header


def _read_fully(fd: int, views: list[memoryview]) -> int:
    """Fill ``views`` one after the other from ``fd`` (a read may return less than asked); bytes read."""
    done = 0
    while views:
        got = os.readv(fd, views)
        if not got:
            break
        done += got
        while views and got >= len(views[0]):
            got -= len(views[0])
            views = views[1:]
        if views and got:
            views[0] = views[0][got:]
    return done


def _atomic_write(path: Path, *parts: Any) -> None:
    """Write ``parts`` (bytes-like) one after the other to a temporary file beside ``path``, then
    rename it into place (one open, vectored writes, one rename: few system calls per entry)."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(temp, flags, 0o644)
    except FileNotFoundError:  # the entry's folder is new
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, flags, 0o644)
    try:
        try:
            _write_fully(fd, [memoryview(data).cast("B") for data in parts if len(data)])
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        _remove(temp)
        raise


def _write_fully(fd: int, views: list[memoryview]) -> None:
    """Write ``views`` one after the other to ``fd`` (a write may take less than given)."""
    while views:
        done = os.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views[0])
            views = views[1:]
        if views and done:
            views[0] = views[0][done:]


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # read-only cache or deleted meanwhile: the time is only a hint for eviction
        pass


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
