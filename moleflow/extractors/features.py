"""``FeatureSet`` and the plain path: the frozen backbone run over a dataset's items in order.

A run takes this path for every dataset it does not read from the feature cache or decode in worker
processes (``source.py``). A plain dataset's items are decoded on ``iter_batches``' thread pool while the
backbone runs over the batches already collated. An augmenting dataset draws from torch's global
generator, so its items are read in order on the calling thread (the draws must not depend on thread
timing); ``decode_all`` decodes its images first, once, on a thread pool, into the dataset's own cache,
so later epochs only augment.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch.utils.data import default_collate
from tqdm import tqdm

from moleflow.extractors.base import by_chunks
from moleflow.extractors.decoding import available_cpus

MAX_DECODE_THREADS = 16
EXTRACT_CHUNK = 16  # images per backbone call in a feature set, whatever the batch size


@dataclass
class FeatureSet:
    """Backbone outputs for a list of images.

    Attributes:
        patches: (N, H, W, D) patch features (on the device the backbone ran on).
        router: (N, D) router features: mean of the patch features over the grid.
        labels: (N,) 0 good / 1 defect.
        masks: (N, S, S) uint8 ground-truth masks (zeros for good images), or None.
        regions: per-pixel PRO weights of ``masks`` and the region count, on the evaluator's device;
            filled by the evaluator on first use (fixed masks' connected components are computed once).
    """

    patches: Tensor
    router: Tensor
    labels: Tensor
    masks: Optional[Tensor]
    regions: Optional[tuple[Tensor, int]] = None

    def __len__(self) -> int:
        return self.patches.shape[0]


def decode_threads() -> int:
    """Threads used to decode images: the CPUs this process may use, at most 16."""
    return max(1, min(MAX_DECODE_THREADS, available_cpus()))


def stored_rows(extractor: nn.Module, images: Tensor) -> Tensor:
    """``extractor.stored(images)`` with the backbone run :func:`by_chunks` of ``EXTRACT_CHUNK`` images, so an
    image's features never depend on its batch (the cache, a held-out pick or ``--batch_size`` keep the bits)."""
    return by_chunks(extractor.stored, images, EXTRACT_CHUNK)


def iter_batches(dataset: Dataset, batch_size: int, threads: Optional[int] = None,
                 pin_memory: bool = False) -> Iterator[dict]:
    """Yield the items of ``dataset`` (an AnomalyDataset) in order, collated into batches, read on ``threads``
    threads (default :func:`decode_threads`; an augmenting dataset: the calling thread alone); ``pin_memory``:
    collate into page-locked memory (asynchronous copies to a GPU)."""
    threads = decode_threads() if threads is None else threads
    n = len(dataset)
    if threads <= 1 or getattr(dataset, "augment", False):
        for start in range(0, n, batch_size):
            yield _collate([dataset[i] for i in range(start, min(n, start + batch_size))], pin_memory)
        return
    lookahead = max(2 * batch_size, 4 * threads)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        pending: deque[Future] = deque()
        submitted = 0
        items: list[dict] = []
        while submitted < n or pending:
            while submitted < n and len(pending) < lookahead:
                pending.append(pool.submit(dataset.__getitem__, submitted))
                submitted += 1
            items.append(pending.popleft().result())
            if len(items) == batch_size or (submitted == n and not pending):
                yield _collate(items, pin_memory)
                items = []


def _collate(items: list[dict], pin_memory: bool) -> dict:
    batch = default_collate(items)
    if pin_memory:
        batch = {k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in batch.items()}
    return batch


def decode_all(dataset: Dataset) -> int:
    """Decode every image of an ``AnomalyDataset`` once into its cache, on a thread pool (no
    augmentation is drawn); returns the image count."""
    with ThreadPoolExecutor(max_workers=decode_threads(), thread_name_prefix="decode") as pool:
        for _ in pool.map(dataset.decoded, range(len(dataset))):
            pass
    return len(dataset)


@torch.no_grad()
def extract_features(extractor: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                     keep_masks: bool, desc: str = "extract", progress: bool = True,
                     stored: Optional[Callable[[Tensor], None]] = None) -> FeatureSet:
    """Run ``extractor`` over ``dataset`` (an AnomalyDataset: items are dicts with image, mask, label).

    Args:
        extractor: frozen backbone, (B, 3, S, S) -> (B, H, W, D).
        batch_size: images per forward pass.
        device: where the backbone runs and the features are kept.
        keep_masks: keep the masks (test sets) or drop them (training sets).
        desc, progress: the tqdm bar's label, and whether to show it.
        stored: called with each batch's stored rows (:func:`stored_rows`: what a cache keeps).
    """
    pin = device.type == "cuda"
    patches, labels, masks = [], [], []
    total = -(-len(dataset) // batch_size)
    for batch in tqdm(iter_batches(dataset, batch_size, pin_memory=pin), total=total, desc=desc,
                      leave=False, disable=not progress):
        rows = stored_rows(extractor, batch["image"].to(device, non_blocking=True))
        if stored is not None:
            stored(rows)
        patches.append(extractor.from_stored(rows))
        labels.append(torch.as_tensor(batch["label"]))
        if keep_masks:
            masks.append((batch["mask"][:, 0] > 0.5).to(torch.uint8))
    all_patches = torch.cat(patches)
    return FeatureSet(patches=all_patches, router=all_patches.mean(dim=(1, 2)),
                      labels=torch.cat(labels), masks=torch.cat(masks) if keep_masks else None)
