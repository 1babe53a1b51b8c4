"""Where a run's features come from: the feature cache, else decoding and the frozen backbone.

``FeatureSource.features(dataset, ...)`` gives the same ``FeatureSet`` as extracting every image:
cached images are read (threads; reading releases the GIL), the others are decoded by worker
processes (``decoding.py``) while the backbone runs on the batches already decoded; the uint8
images go to the device and are normalised there, with the arithmetic of ``AnomalyDataset``
(true divisions), so the backbone sees the same floats. New features are written to the cache by
a few threads while extraction goes on. An augmenting dataset draws its augmentations from torch's
global generator in item order: it is decoded and extracted as before (``features.py``) and never
cached.
"""

from __future__ import annotations

import contextlib
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
from moleflow.extractors.decoding import CHUNK, available_cpus, decoded_chunks
from moleflow.extractors.features import FeatureSet, decode_all, extract_features

Phase = Callable[[str], ContextManager[None]]
WRITERS = 4  # threads writing cache entries while extraction goes on
PENDING_BYTES = 4 << 30  # host copies of features waiting to be written, at most (background writes)


@dataclass
class FeatureCount:
    """Images whose features came from the cache and images decoded and extracted."""

    cached: int = 0
    extracted: int = 0

    def add(self, other: "FeatureCount") -> None:
        self.cached += other.cached
        self.extracted += other.extracted


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
            ``PENDING_BYTES`` of them waiting; ``flush()`` waits for them. False: each ``features``
            call returns once its entries are written.
    """

    def __init__(self, extractor: FeatureExtractor, device: torch.device, batch_size: int, workers: int,
                 cache: Optional[FeatureCache] = None, progress: bool = False, background: bool = False) -> None:
        self.extractor, self.device, self.batch_size = extractor, device, batch_size
        self.workers, self.cache, self.progress, self.background = workers, cache, progress, background
        self.total = FeatureCount()
        self._writer: Optional[ThreadPoolExecutor] = None
        self._writes: deque[tuple[Future, int]] = deque()  # (write, its bytes), oldest first
        self._pending_bytes = 0
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self._scale = torch.tensor(255.0, device=device)

    def features(self, dataset: AnomalyDataset, keep_masks: bool, desc: str,
                 phase: Phase = _no_phase) -> tuple[FeatureSet, FeatureCount]:
        """The ``FeatureSet`` of ``dataset`` and how many images came from the cache.

        ``phase`` is told ``data_decode`` (reading the cache) and ``feature_extraction`` (decoding
        overlapped with the backbone) around the work.
        """
        if dataset.augment or (self.cache is None and not self.workers):
            with phase("data_decode"):
                decode_all(dataset)
            with phase("feature_extraction"):
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
        (h, w), dim = self.extractor.grid_size(), self.extractor.feature_dim
        masks = torch.zeros(n, size, size, dtype=torch.uint8) if keep_masks else None
        keys: list[Optional[str]] = [None] * n
        found = [False] * n
        with phase("data_decode"):  # features read instead of images decoded
            host = torch.empty(0)
            if self.cache is not None:
                host = torch.empty(n, h, w, dim, pin_memory=self.device.type == "cuda")
                keys, found = self._read(dataset, host, masks)
        patches = torch.empty(n, h, w, dim, device=self.device)
        with phase("feature_extraction"):
            hits = [i for i in range(n) if found[i]]
            if len(hits) == n:  # the usual warm case: one copy of the whole block
                patches.copy_(host, non_blocking=True)
            elif hits:
                index = torch.tensor(hits)
                patches[index.to(self.device)] = host[index].to(self.device, non_blocking=True)
            missing = [i for i in range(n) if not found[i]]
            if missing:
                self._extract(dataset, missing, patches, masks, keys, desc)
        labels = torch.tensor([s.label for s in dataset.samples], dtype=torch.long)  # also a shard of a dataset
        feats = FeatureSet(patches=patches, router=patches.mean(dim=(1, 2)), labels=labels, masks=masks)
        return feats, FeatureCount(cached=len(hits), extracted=len(missing))

    def _read(self, dataset: AnomalyDataset, host: Tensor,
              masks: Optional[Tensor]) -> tuple[list[Optional[str]], list[bool]]:
        """The cache keys of ``dataset``'s images (None: the file is not readable; it is reported where
        it is decoded) and which were found, read into ``host`` (and ``masks``), on a thread pool."""
        def one(i: int) -> tuple[Optional[str], bool]:
            try:
                key = self.cache.key(dataset.samples[i], dataset.img_size, dataset.resize_mode)
            except OSError:
                return None, False
            entry = self.cache.read(key, host[i])
            if entry is not None and masks is not None and entry.mask is not None:
                masks[i] = entry.mask
            return key, entry is not None

        with ThreadPoolExecutor(max_workers=max(1, min(16, available_cpus()))) as pool:
            keys, found = zip(*pool.map(one, range(len(dataset)))) if len(dataset) else ((), ())
        return list(keys), list(found)

    @torch.no_grad()
    def _extract(self, dataset: AnomalyDataset, indices: list[int], patches: Tensor, masks: Optional[Tensor],
                 keys: list[Optional[str]], desc: str) -> None:
        """Decode and extract the images ``indices`` of ``dataset`` into ``patches`` (and ``masks``),
        writing each new entry to the cache."""
        samples = [dataset.samples[i] for i in indices]
        if not self.workers:  # no worker processes: the images on a thread pool, then the backbone
            self._extract_in_process(dataset, indices, patches, masks, keys, desc)
            return
        workers = self.workers if len(samples) > 2 * CHUNK else 0  # a few images: worker start-up costs more
        chunks = decoded_chunks(samples, dataset.img_size, dataset.resize_mode, workers)
        pending: list[tuple[np.ndarray, Optional[np.ndarray]]] = []  # decoded, not yet extracted
        done = 0
        bar = tqdm(total=len(indices), desc=desc, leave=False, disable=not self.progress)
        try:
            for images, chunk_masks in chunks:
                pending.extend(zip(images, chunk_masks))
                while len(pending) >= self.batch_size or (pending and done + len(pending) == len(indices)):
                    batch, pending = pending[:self.batch_size], pending[self.batch_size:]
                    at = indices[done:done + len(batch)]
                    feats = self._run(np.stack([image for image, _ in batch]))
                    patches[torch.tensor(at, device=self.device)] = feats
                    batch_masks = [None if mask is None else torch.from_numpy(mask) for _, mask in batch]
                    if masks is not None:
                        for i, mask in zip(at, batch_masks):
                            if mask is not None:
                                masks[i] = mask
                    self._store([keys[i] for i in at], feats, batch_masks)
                    done += len(batch)
                    bar.update(len(batch))
        finally:
            bar.close()
        if not self.background:
            self.flush()

    def _extract_in_process(self, dataset: AnomalyDataset, indices: list[int], patches: Tensor,
                            masks: Optional[Tensor], keys: list[Optional[str]], desc: str) -> None:
        """``_extract`` without worker processes: ``decode_all`` and ``extract_features`` over the
        images ``indices``, then their cache entries written."""
        part = AnomalyDataset([dataset.samples[i] for i in indices], dataset.img_size,
                              resize_mode=dataset.resize_mode)
        decode_all(part)
        feats = extract_features(self.extractor, part, self.batch_size, self.device, keep_masks=True, desc=desc,
                                 progress=self.progress)
        at = torch.tensor(indices)
        patches[at.to(self.device)] = feats.patches
        if masks is not None:
            masks[at] = feats.masks
        self._store([keys[i] for i in indices], feats.patches,
                    [mask if sample.mask_path else None for sample, mask in zip(part.samples, feats.masks)])
        if not self.background:
            self.flush()

    def _store(self, keys: list[Optional[str]], feats: Tensor, masks: list[Optional[Tensor]]) -> None:
        """Queue the cache entries of ``feats`` (one per image; a None key is not stored)."""
        if self.cache is None:
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="cache-write")
        host = feats.cpu()
        for key, patches, mask in zip(keys, host, masks):
            if key is not None:
                size = patches.numel() * patches.element_size()
                self._writes.append((self._writer.submit(self.cache.write, key, patches, mask), size))
                self._pending_bytes += size
        while self._pending_bytes > PENDING_BYTES:  # bound the host memory held by waiting writes
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
        """uint8 ``(B, S, S, 3)`` -> features ``(B, H, W, D)`` on the device."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).float().div_(self._scale)
        return self.extractor((x - self._mean) / self._std)
