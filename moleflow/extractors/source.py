"""Where a run's features come from: the feature cache, else decoding and the frozen backbone.

``FeatureSource.features(dataset, ...)`` gives the same ``FeatureSet`` as extracting every image: cached
images are read (threads; reading releases the GIL); the others are decoded while the backbone runs on the
batches already decoded, on a thread pool (``features.py``) or, with ``--num_workers``, by worker processes
(``decoding.py``; their uint8 images are normalised on the device with ``AnomalyDataset``'s arithmetic, so
the backbone sees the same floats). A few threads write new features to the cache meanwhile. An augmenting
dataset (augmentations drawn from torch's global generator in item order) is decoded first, then extracted
in order (``features.py``), and never cached. Without a cache and worker processes every dataset takes the
``features.py`` path.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from moleflow.data.dataset import IMAGENET_MEAN, IMAGENET_STD, AnomalyDataset
from moleflow.extractors.base import FeatureExtractor
from moleflow.extractors.cache import FeatureCache
from moleflow.extractors.decoding import CHUNK, decoded_chunks
from moleflow.extractors.features import FeatureSet, decode_all, decode_threads, extract_features, stored_rows

Phase = Callable[[str], ContextManager[None]]
WRITERS = 4  # threads writing cache entries while extraction goes on
STAGING_BYTES = 256 << 20  # each of the two pinned blocks that cached features pass through to a GPU


@dataclass
class FeatureCount:
    """Images whose features came from the cache and images decoded and extracted."""

    cached: int = 0
    extracted: int = 0

    def add(self, other: "FeatureCount") -> None:
        self.cached += other.cached
        self.extracted += other.extracted


def pending_limit() -> int:
    """Bytes of features that may wait in host memory for their cache write (background writes): a
    quarter of the host's memory, at most 16 GB, so training goes on while a slow disk catches up."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 16 << 30
    return max(1 << 30, min(16 << 30, memory // 4))


def _no_phase(name: str) -> ContextManager[None]:
    return contextlib.nullcontext()


class FeatureSource:
    """The features of datasets, from ``cache`` (None: no cache) or from ``extractor``.

    Args:
        extractor: the frozen backbone (on ``device``).
        device: where the backbone runs and the features are kept.
        batch_size: images per backbone pass.
        workers: decoding worker processes (0: decode in this process).
        cache: the feature cache, or None.
        progress: tqdm bars.
        background: new cache entries are written while the caller goes on (training), up to
            ``pending_limit()`` bytes of them waiting; ``flush()`` waits for them. False: each ``features``
            call returns once its entries are written.
    """

    def __init__(self, extractor: FeatureExtractor, device: torch.device, batch_size: int, workers: int,
                 cache: Optional[FeatureCache] = None, progress: bool = False, background: bool = False) -> None:
        self.extractor, self.device, self.batch_size = extractor, device, batch_size
        self.workers, self.cache, self.progress, self.background = workers, cache, progress, background
        self.total = FeatureCount()
        self._writer: Optional[ThreadPoolExecutor] = None
        self._reader: Optional[ThreadPoolExecutor] = None
        self._writes: deque[tuple[Future, int]] = deque()  # (write, its bytes), oldest first
        self._pending_bytes = 0
        self._pending_limit = pending_limit()
        self._staging: Optional[list[Tensor]] = None
        self._uploaded: list[Optional[torch.cuda.Event]] = [None, None]
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self._scale = torch.tensor(255.0, device=device)

    def features(self, dataset: AnomalyDataset, keep_masks: bool, desc: str,
                 phase: Phase = _no_phase) -> tuple[FeatureSet, FeatureCount]:
        """The ``FeatureSet`` of ``dataset`` and how many images came from the cache.

        ``phase`` is told ``data_decode`` (reading the cache; decoding an augmenting dataset first) and
        ``feature_extraction`` (the backbone, with the decoding of every other dataset) around the work.
        """
        if dataset.augment or (self.cache is None and not self.workers):
            if dataset.augment:  # augmented in item order on this thread: the images decoded first, in parallel
                with phase("data_decode"):
                    decode_all(dataset)
            with phase("feature_extraction"):  # a plain dataset is decoded on a thread pool while the backbone runs
                feats = extract_features(self.extractor, dataset, self.batch_size, self.device, keep_masks,
                                         desc=desc, progress=self.progress)
            count = FeatureCount(extracted=len(dataset))
        else:
            feats, count = self._features(dataset, keep_masks, desc, phase)
        self.total.add(count)
        return feats, count

    def _features(self, dataset: AnomalyDataset, keep_masks: bool, desc: str,
                  phase: Phase) -> tuple[FeatureSet, FeatureCount]:
        n, size = len(dataset), dataset.img_size
        masks = torch.zeros(n, size, size, dtype=torch.uint8) if keep_masks else None
        keys: list[Optional[str]] = [None] * n
        found = [False] * n
        patches = torch.empty(n, *self.extractor.grid_size(), self.extractor.feature_dim, device=self.device)
        with phase("data_decode"):  # features read instead of images decoded
            if self.cache is not None:
                keys, found = self._read(dataset, patches, masks)
        with phase("feature_extraction"):
            missing = [i for i in range(n) if not found[i]]
            if missing:
                self._extract(dataset, missing, patches, masks, keys, desc)
            if not self.background:
                self.flush()
        labels = torch.tensor([s.label for s in dataset.samples], dtype=torch.long)  # also a shard of a dataset
        feats = FeatureSet(patches=patches, router=patches.mean(dim=(1, 2)), labels=labels, masks=masks)
        return feats, FeatureCount(cached=n - len(missing), extracted=len(missing))

    def _read(self, dataset: AnomalyDataset, patches: Tensor,
              masks: Optional[Tensor]) -> tuple[list[Optional[str]], list[bool]]:
        """The cache keys of ``dataset``'s images (None: not readable; reported where it is decoded) and
        which entries were found, read into ``patches`` (and ``masks``).

        Block by block, keys are made and looked up in this thread (hashing on threads fights over the GIL)
        while reader threads read the block before (reads and checks release the GIL): on the CPU straight
        into ``patches``, on a GPU into two pinned staging blocks in turn, one copied to the device while
        the other is read (pinning is slow: the blocks are made once per source, once an entry is found).
        """
        n = len(dataset)
        keys: list[Optional[str]] = [None] * n
        found = [False] * n
        shape, dtype = self.extractor.stored_row(self.device)
        direct = patches.device.type == "cpu" and not self.extractor.keeps_maps(self.device)
        rows = n if direct else self._staging_rows(shape, dtype)
        before = None  # (turn, start, stop, wait, hits) of the block being read
        for turn, start in enumerate(range(0, n, rows)):
            stop = min(n, start + rows)
            keys[start:stop] = [self._key(dataset, i) for i in range(start, stop)]
            locations = self.cache.locate(keys[start:stop])
            hits = [i for i in range(start, stop) if locations[i - start] is not None]
            reading = None
            if hits:
                block = patches[start:stop] if direct else self._stage(turn % 2, shape, dtype)
                requests = [(locations[i - start], block[i - start], masks[i] if masks is not None else None)
                            for i in hits]
                reading = (turn, start, stop, self.cache.read_located(requests, self._readers().submit), hits)
            if before is not None:
                self._finish(*before, found, patches, masks, direct)
            before = reading
        if before is not None:
            self._finish(*before, found, patches, masks, direct)
        return keys, found

    def _finish(self, turn: int, start: int, stop: int, wait: Callable[[], list], hits: list[int], found: list[bool],
                patches: Tensor, masks: Optional[Tensor], direct: bool) -> None:
        """Wait for the reads of rows ``start:stop`` and mark the ``found`` ones; unless they were read
        straight into ``patches``, copy them from their staging block to the device (without waiting for
        the copy) and make them features there."""
        for i, entry in zip(hits, wait()):
            found[i] = entry is not None
            if masks is not None and entry is None:
                masks[i].zero_()  # what a corrupt entry left there (an entry without a mask writes nothing)
            elif masks is not None and entry.mask is not None and entry.mask.data_ptr() != masks[i].data_ptr():
                masks[i].copy_(entry.mask)
        if not direct:
            self._upload(turn % 2, self._staging[turn % 2][:stop - start], patches, start, found[start:stop])

    def _readers(self) -> ThreadPoolExecutor:
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=decode_threads(), thread_name_prefix="cache-read")
        return self._reader

    def _key(self, dataset: AnomalyDataset, index: int) -> Optional[str]:
        """The cache key of image ``index`` (None: its file is not readable)."""
        try:
            return self.cache.key(dataset.samples[index], dataset.img_size, dataset.resize_mode)
        except OSError:
            return None

    @staticmethod
    def _staging_rows(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return max(1, STAGING_BYTES // (int(np.prod(shape)) * dtype.itemsize))

    def _stage(self, which: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Staging block ``which`` (0 or 1) of stored rows, free to refill (pinned for a GPU)."""
        if self._staging is None or tuple(self._staging[0].shape[1:]) != shape or self._staging[0].dtype != dtype:
            rows, pin = self._staging_rows(shape, dtype), self.device.type == "cuda"
            self._staging = [torch.empty(rows, *shape, dtype=dtype, pin_memory=pin) for _ in range(2)]
            self._uploaded = [None, None]
        if self._uploaded[which] is not None:
            self._uploaded[which].synchronize()  # its last copy to the device is done
        return self._staging[which]

    def _upload(self, which: int, block: Tensor, patches: Tensor, start: int, found: list[bool]) -> None:
        """The features of the found rows of staging ``block`` into ``patches[start:]``, without waiting
        for the copy to the device."""
        rows = block.to(self.device, non_blocking=True)
        if all(found):
            patches[start:start + len(block)] = self.extractor.from_stored(rows)
        else:
            hits = torch.tensor([j for j, hit in enumerate(found) if hit], device=self.device)
            patches[start + hits] = self.extractor.from_stored(rows[hits])
        if self.device.type == "cuda":
            self._uploaded[which] = torch.cuda.Event()
            self._uploaded[which].record()

    @torch.no_grad()
    def _extract(self, dataset: AnomalyDataset, indices: list[int], patches: Tensor, masks: Optional[Tensor],
                 keys: list[Optional[str]], desc: str) -> None:
        """Decode and extract the images ``indices`` of ``dataset`` into ``patches`` (and ``masks``),
        queuing each new entry for the cache."""
        if not self.workers:  # no worker processes: decoded on a thread pool while the backbone runs
            self._extract_in_process(dataset, indices, patches, masks, keys, desc)
            return
        workers = self.workers if len(indices) > 2 * CHUNK else 0  # a few images: worker start-up costs more
        samples = [dataset.samples[i] for i in indices]
        chunks = decoded_chunks(samples, dataset.img_size, dataset.resize_mode, workers)
        pending: list[tuple[np.ndarray, Optional[np.ndarray]]] = []  # decoded, not yet extracted
        done = 0
        with tqdm(total=len(indices), desc=desc, leave=False, disable=not self.progress) as bar:
            for images, chunk_masks in chunks:
                pending.extend(zip(images, chunk_masks))
                while len(pending) >= self.batch_size or (pending and done + len(pending) == len(indices)):
                    batch, pending = pending[:self.batch_size], pending[self.batch_size:]
                    at = indices[done:done + len(batch)]
                    rows = self._run(np.stack([image for image, _ in batch]))
                    patches[torch.tensor(at, device=self.device)] = self.extractor.from_stored(rows)
                    batch_masks = [None if mask is None else torch.from_numpy(mask) for _, mask in batch]
                    if masks is not None:
                        for i, mask in zip(at, batch_masks):
                            if mask is not None:
                                masks[i] = mask
                    self._store([keys[i] for i in at], rows, batch_masks)
                    done += len(batch)
                    bar.update(len(batch))

    def _extract_in_process(self, dataset: AnomalyDataset, indices: list[int], patches: Tensor,
                            masks: Optional[Tensor], keys: list[Optional[str]], desc: str) -> None:
        """``_extract`` without worker processes: ``extract_features`` over the images ``indices`` (decoded on
        its thread pool while the backbone runs), then their cache entries queued."""
        part = AnomalyDataset([dataset.samples[i] for i in indices], dataset.img_size,
                              resize_mode=dataset.resize_mode)
        rows: list[Tensor] = []
        feats = extract_features(self.extractor, part, self.batch_size, self.device, keep_masks=True, desc=desc,
                                 progress=self.progress, stored=rows.append)
        at = torch.tensor(indices)
        patches[at.to(self.device)] = feats.patches
        if masks is not None:
            masks[at] = feats.masks
        self._store([keys[i] for i in indices], torch.cat(rows),
                    [mask if sample.mask_path else None for sample, mask in zip(part.samples, feats.masks)])

    def _store(self, keys: list[Optional[str]], rows: Tensor, masks: list[Optional[Tensor]]) -> None:
        """Queue the cache entries of the stored ``rows`` (one per image; a None key is not stored)."""
        if self.cache is None:
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="cache-write")
        host = rows.cpu()
        for key, row, mask in zip(keys, host, masks):
            if key is not None:
                size = row.numel() * row.element_size()
                self._writes.append((self._writer.submit(self.cache.write, key, row, mask), size))
                self._pending_bytes += size
        while self._pending_bytes > self._pending_limit:  # bound the host memory held by waiting writes
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, size = self._writes.popleft()
        future.result()
        self._pending_bytes -= size

    def flush(self) -> None:
        """Wait for every queued cache entry, then keep the cache under its bound."""
        if not self._writes:
            return
        while self._writes:
            self._wait_oldest()
        self.cache.trim()

    def _run(self, images: np.ndarray) -> Tensor:
        """uint8 ``(B, S, S, 3)`` -> the extractor's stored rows on the device."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).float().div_(self._scale)
        return stored_rows(self.extractor, (x - self._mean) / self._std)
