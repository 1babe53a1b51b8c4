"""The per-task patch memory: coreset, nearest distances, standardisation, fusion, and that a task's
memory and its fused scores never change once later tasks are added."""

from __future__ import annotations

import torch

from moleflow.models.memory import PatchMemory, TaskMemory, fit_task_memory, greedy_coreset, nearest_distance


def _clusters(per: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    points = torch.cat([c + torch.randn(per, 2, generator=gen) for c in centres])
    return points, torch.arange(3).repeat_interleave(per)


def test_greedy_coreset_covers_separated_clusters_and_keeps_all_when_large():
    points, cluster = _clusters()
    picked = greedy_coreset(points, 3, seed=1)
    assert sorted(cluster[picked].tolist()) == [0, 1, 2]  # farthest-point picks land in every cluster
    assert torch.equal(greedy_coreset(points, 100), torch.arange(60))
    # each pick is the point farthest from those picked before it (k-centre greedy), checked by hand
    picked = greedy_coreset(points, 6, seed=2)
    for i in range(1, 6):
        nearest = torch.cdist(points, points[picked[:i]]).min(dim=1).values
        assert nearest[picked[i]] == nearest.max()


def test_nearest_distance_matches_brute_force_and_skips_own_image():
    gen = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 8, generator=gen), torch.randn(30, 8, generator=gen)
    brute = torch.cdist(queries.double(), bank.double()).min(dim=1).values.float()
    torch.testing.assert_close(nearest_distance(queries, bank), brute, rtol=1e-5, atol=1e-5)
    q_owner, b_owner = torch.arange(50) % 5, torch.arange(30) % 5
    d = torch.cdist(queries.double(), bank.double())
    d[q_owner[:, None] == b_owner[None, :]] = float("inf")
    torch.testing.assert_close(nearest_distance(queries, bank, q_owner, b_owner), d.min(dim=1).values.float(),
                               rtol=1e-5, atol=1e-5)


def test_fit_task_memory_statistics_by_hand():
    gen = torch.Generator().manual_seed(3)
    patches = torch.randn(4, 2, 3, 5, generator=gen)             # 4 images of 2x3 patches
    flow = torch.rand(4, 2, 3, generator=gen) * 10
    memory = fit_task_memory(patches, flow, size=0)              # 0 keeps every patch
    flat = patches.reshape(-1, 5).double()
    owner = torch.arange(4).repeat_interleave(6)
    d = torch.cdist(flat, flat)
    d[owner[:, None] == owner[None, :]] = float("inf")           # never compared with its own image
    held_out = d.min(dim=1).values
    assert memory.bank.shape == (24, 5)
    assert abs(memory.memory_mean - float(held_out.mean())) < 1e-5
    assert abs(memory.memory_std - float(held_out.std())) < 1e-5
    assert abs(memory.flow_mean - float(flow.double().mean())) < 1e-5
    assert abs(memory.flow_std - float(flow.double().std())) < 1e-5


def test_fuse_is_the_weighted_mean_of_standardised_scores():
    memory = PatchMemory()
    memory.add_task(TaskMemory(bank=torch.zeros(1, 2), flow_mean=10.0, flow_std=2.0, memory_mean=1.0, memory_std=0.5))
    memory.add_task(TaskMemory(bank=torch.full((1, 2), 3.0), flow_mean=0.0, flow_std=1.0, memory_mean=0.0,
                               memory_std=1.0))
    patches = torch.tensor([[[[3.0, 4.0]]], [[[3.0, 3.0]]]])      # (2, 1, 1, 2)
    flow = torch.tensor([[[14.0]], [[5.0]]])
    ids = torch.tensor([0, 1])
    fused = memory.fuse(flow, patches, ids, weight=0.7)
    # image 0 -> task 0: flow z (14-10)/2 = 2, distance 5 -> z (5-1)/0.5 = 8; image 1 -> task 1: z 5 and 0
    torch.testing.assert_close(fused, torch.tensor([[[0.3 * 2 + 0.7 * 8]], [[0.3 * 5 + 0.7 * 0]]]))
    torch.testing.assert_close(memory.fuse(None, patches, ids, weight=1.0), torch.tensor([[[8.0]], [[0.0]]]))


def test_earlier_task_memory_and_scores_unchanged_after_later_tasks():
    gen = torch.Generator().manual_seed(7)
    memory = PatchMemory()
    train0 = torch.randn(3, 2, 2, 4, generator=gen)
    memory.add_task(fit_task_memory(train0, torch.rand(3, 2, 2, generator=gen), size=5, seed=0))
    probe = torch.randn(2, 2, 2, 4, generator=gen)
    flow = torch.rand(2, 2, 2, generator=gen)
    ids = torch.zeros(2, dtype=torch.long)
    before = memory.fuse(flow, probe, ids, 0.7).clone()
    state0 = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in memory.tasks[0].state().items()}
    for task in (1, 2):
        memory.add_task(fit_task_memory(torch.randn(3, 2, 2, 4, generator=gen) + 5 * task,
                                        torch.rand(3, 2, 2, generator=gen), size=5, seed=task))
    assert torch.equal(memory.fuse(flow, probe, ids, 0.7), before)
    after = memory.tasks[0].state()
    assert torch.equal(after["bank"], state0["bank"]) and all(after[k] == state0[k] for k in state0 if k != "bank")
    restored = PatchMemory.from_state(memory.state())
    assert torch.equal(restored.fuse(flow, probe, ids, 0.7), before)
