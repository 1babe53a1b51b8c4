"""Per-task memory of normal patch features, fused with the flow's patch scores.

After a task is trained, a coreset of its training patch features (greedy k-centre on a random
projection, as in PatchCore) is stored as that task's memory; it is never changed afterwards, so
an earlier task's scores stay exactly what they were. At test time each patch's distance to the
nearest memory patch of its routed task is a second anomaly score. Both scores are standardised
with statistics of the task's own training images (the flow's NLL on the training patches; the
memory distance of each training patch to the memory patches of *other* training images, so a
patch is never compared with itself) and averaged:

    S_p = (1 - w) * (NLL_p - mu_f) / sigma_f + w * (d_p - mu_m) / sigma_m

``w = 1`` is the memory alone (the per-class nearest-neighbour baseline when the task is known);
``w = 0`` is the flow alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

PROJECTION_DIM = 128  # random projection used only to pick the coreset
QUERY_CHUNK = 4096  # query patches per distance product


def greedy_coreset(features: Tensor, size: int, seed: int = 0) -> Tensor:
    """Indices of a greedy k-centre coreset (each pick is the point farthest from those picked).

    Args:
        features: (N, D) points.
        size: how many to pick; all N (in order) when size >= N.
        seed: seed of the random projection and of the first pick.

    Returns:
        (size,) long indices into ``features``.
    """
    n = features.shape[0]
    if size >= n:
        return torch.arange(n, device=features.device)
    generator = torch.Generator().manual_seed(seed)
    dim = features.shape[1]
    if dim > PROJECTION_DIM:
        projection = torch.randn(dim, PROJECTION_DIM, generator=generator) / PROJECTION_DIM ** 0.5
        points = features.float() @ projection.to(features.device)
    else:
        points = features.float()
    squared = points.pow(2).sum(dim=1)
    first = int(torch.randint(n, (1,), generator=generator))
    picked = torch.empty(size, dtype=torch.long, device=features.device)
    picked[0] = first
    nearest = torch.empty_like(squared)
    step = torch.empty_like(squared)

    def to(index: Tensor | int, out: Tensor) -> Tensor:  # squared distances of every point to point ``index``
        centre = points[index]
        torch.addmv(squared, points, centre, alpha=-2.0, out=out)
        return out.add_(centre.pow(2).sum()).clamp_min_(0.0)

    # Thousands of small sequential steps: one CPU thread avoids a thread barrier per step (same picks).
    with _one_cpu_thread(features.device):
        to(first, nearest)
        for i in range(1, size):
            index = nearest.argmax()
            picked[i] = index
            torch.minimum(nearest, to(index, step), out=nearest)
    return picked


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the block with one intra-op thread (restored after); elsewhere a no-op."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def nearest_distance(queries: Tensor, bank: Tensor, query_owner: Optional[Tensor] = None,
                     bank_owner: Optional[Tensor] = None) -> Tensor:
    """Euclidean distance of each query to its nearest bank point, in float32.

    Args:
        queries: (Q, D).
        bank: (M, D).
        query_owner: (Q,) image index of each query; with ``bank_owner``, bank points of the
            query's own image are skipped (leave-one-image-out).
        bank_owner: (M,) image index of each bank point.

    Returns:
        (Q,) distances.
    """
    bank = bank.float()
    bank_sq = bank.pow(2).sum(dim=1)
    out = torch.empty(queries.shape[0], dtype=torch.float32, device=queries.device)
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        q = queries[start:start + QUERY_CHUNK].float()
        d2 = q.pow(2).sum(dim=1, keepdim=True) + bank_sq - 2.0 * (q @ bank.T)
        if query_owner is not None and bank_owner is not None:
            own = query_owner[start:start + QUERY_CHUNK, None] == bank_owner[None, :]
            d2 = d2.masked_fill(own, float("inf"))
        out[start:start + QUERY_CHUNK] = d2.min(dim=1).values.clamp_min(0.0).sqrt()
    return out


@dataclass
class TaskMemory:
    """One task's memory patches and the score statistics of its training images.

    Attributes:
        bank: (M, D) memory patch features.
        flow_mean, flow_std: mean and std of the flow's patch NLL on the training images.
        memory_mean, memory_std: mean and std of the training patches' leave-one-image-out
            memory distance.
    """

    bank: Tensor
    flow_mean: float
    flow_std: float
    memory_mean: float
    memory_std: float

    def state(self) -> dict:
        return {"bank": self.bank.cpu(), "flow_mean": self.flow_mean, "flow_std": self.flow_std,
                "memory_mean": self.memory_mean, "memory_std": self.memory_std}

    @classmethod
    def from_state(cls, state: dict) -> "TaskMemory":
        return cls(bank=state["bank"], flow_mean=float(state["flow_mean"]), flow_std=float(state["flow_std"]),
                   memory_mean=float(state["memory_mean"]), memory_std=float(state["memory_std"]))


def fit_task_memory(patches: Tensor, flow_scores: Optional[Tensor], size: int, seed: int = 0) -> TaskMemory:
    """Build one task's memory from its training patches.

    Args:
        patches: (N, H, W, D) training patch features of the task.
        flow_scores: (N, H, W) the trained flow's patch NLL on them, or None (memory alone).
        size: memory patches to keep (all when the task has fewer, or when 0).
        seed: coreset seed.
    """
    n, height, width, dim = patches.shape
    flat = patches.reshape(-1, dim)
    owner = torch.arange(n, device=patches.device).repeat_interleave(height * width)
    keep = greedy_coreset(flat, size if size > 0 else flat.shape[0], seed=seed)
    bank = flat[keep].float().contiguous()
    if n > 1:
        held_out = nearest_distance(flat, bank, owner, owner[keep])
        held_out = held_out[torch.isfinite(held_out)]
    else:
        held_out = torch.zeros(1, device=patches.device)
    flow_mean, flow_std = (0.0, 1.0) if flow_scores is None else _mean_std(flow_scores.flatten())
    memory_mean, memory_std = _mean_std(held_out)
    return TaskMemory(bank=bank, flow_mean=flow_mean, flow_std=flow_std, memory_mean=memory_mean,
                      memory_std=memory_std)


def _mean_std(values: Tensor) -> tuple[float, float]:
    values = values.double()
    std = float(values.std()) if values.numel() > 1 else 0.0
    return float(values.mean()), max(std, 1e-6)


class PatchMemory:
    """The memories of all tasks seen so far (one :class:`TaskMemory` per task, never changed)."""

    def __init__(self) -> None:
        self.tasks: list[TaskMemory] = []
        self._banks: dict[tuple[int, str], Tensor] = {}

    def add_task(self, memory: TaskMemory) -> None:
        self.tasks.append(memory)

    def _bank(self, task_id: int, device: torch.device) -> Tensor:
        key = (task_id, str(device))
        if key not in self._banks:
            self._banks[key] = self.tasks[task_id].bank.to(device)
        return self._banks[key]

    def distances(self, patches: Tensor, task_ids: Tensor) -> Tensor:
        """(N, H, W, D) features, (N,) task per image -> (N, H, W) nearest-memory distances."""
        n, height, width, dim = patches.shape
        out = torch.empty(n, height, width, dtype=torch.float32, device=patches.device)
        task_ids = task_ids.to(patches.device)
        for task in torch.unique(task_ids).tolist():
            rows = (task_ids == task).nonzero().flatten()
            queries = patches[rows].reshape(-1, dim)
            out[rows] = nearest_distance(queries, self._bank(task, patches.device)).reshape(-1, height, width)
        return out

    def fuse(self, flow_scores: Optional[Tensor], patches: Tensor, task_ids: Tensor, weight: float) -> Tensor:
        """Fused patch scores (module docstring): (N, H, W) flow NLL (None when ``weight`` is 1),
        (N, H, W, D) features, (N,) routed tasks -> (N, H, W)."""
        dist = self.distances(patches, task_ids)
        ids = task_ids.to(dist.device)
        stats = torch.tensor([[m.flow_mean, m.flow_std, m.memory_mean, m.memory_std] for m in self.tasks],
                             dtype=torch.float32, device=dist.device)[ids][:, :, None, None]
        memory_z = (dist - stats[:, 2]) / stats[:, 3]
        if weight >= 1.0 or flow_scores is None:
            return memory_z
        flow_z = (flow_scores.to(dist.device).float() - stats[:, 0]) / stats[:, 1]
        return (1.0 - weight) * flow_z + weight * memory_z

    def state(self) -> list[dict]:
        return [m.state() for m in self.tasks]

    @classmethod
    def from_state(cls, state: list[dict]) -> "PatchMemory":
        memory = cls()
        memory.tasks = [TaskMemory.from_state(s) for s in state]
        return memory
