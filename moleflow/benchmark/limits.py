"""The limits the benchmark compares against, measured in the same process, plus our flow alone.

* backbone alone: a timm CNN's stride-8 and stride-16 stages, forward only, images already on the
  device; float32 and bfloat16 autocast + channels-last.
* reference flow alone: a FrEIA ``SequenceINN`` of 8 ``AllInOneBlock`` couplings over the 28x28
  patches of D = 768 (subnet Linear(D/2, D) - ReLU - Linear(D, D)), Adam on the patch NLL; inference.
* our flow alone: the trainer's own training step (``trainer/steps.py``) for task 0 (everything
  trains) and task 1 (frozen base), and inference.

Every figure is images per second after warm-up steps, the device synchronised before the clock
is read. On the CPU the same code runs with tiny sizes (tests).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import timm
import torch
from torch import Tensor, nn

from moleflow.build import build_backbone, build_flow, build_trainer
from moleflow.config.ablation import AblationConfig
from moleflow.extractors.cnn_extractor import select_stages
from moleflow.models.loss import patch_nll
from moleflow.trainer import steps
from moleflow.utils.precision import matmul_tf32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step: Callable[[], object], images_per_step: int, device: torch.device,
                      warmup: int, iters: int) -> float:
    """Run ``step`` ``warmup`` times, then time ``iters`` runs; return images per second."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return images_per_step * iters / (time.perf_counter() - start)


@torch.no_grad()
def backbone_limit(device: torch.device, name: str = "wide_resnet50_2", batch: int = 64, img_size: int = 224,
                   bf16: bool = False, warmup: int = 5, iters: int = 20) -> float:
    """Forward images/s of the backbone's stride-8 and stride-16 stages (random weights)."""
    probe = timm.create_model(name, features_only=True, pretrained=False)
    indices = select_stages(list(probe.feature_info.reduction()))
    model = timm.create_model(name, features_only=True, pretrained=False, out_indices=indices).to(device).eval()
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    if bf16 and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> object:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            return model(images)

    return images_per_second(step, batch, device, warmup, iters)


def _subnet(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.ReLU(), nn.Linear(2 * c_in, c_out))


def reference_flow(dim: int = 768, blocks: int = 8) -> nn.Module:
    """FrEIA SequenceINN of ``blocks`` AllInOneBlocks on D-vectors (one per patch)."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm
    inn = Ff.SequenceINN(dim)
    for _ in range(blocks):
        inn.append(Fm.AllInOneBlock, subnet_constructor=_subnet, affine_clamping=2.0, permute_soft=False)
    return inn


def reference_flow_limits(device: torch.device, dim: int = 768, grid: int = 28, blocks: int = 8, batch: int = 64,
                          tf32: bool = False, warmup: int = 3, iters: int = 10) -> dict[str, float]:
    """Training and inference images/s of the FrEIA reference flow over ``grid x grid`` patches."""
    torch.manual_seed(0)
    flow = reference_flow(dim, blocks).to(device)
    x = torch.randn(batch * grid * grid, dim, device=device)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4, fused=device.type == "cuda")

    def train_step() -> object:
        z, log_det = flow(x)
        loss = (0.5 * z.pow(2).sum(dim=1) - log_det).mean() / dim
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    @torch.no_grad()
    def infer_step() -> object:
        z, log_det = flow(x)
        return 0.5 * z.pow(2).sum(dim=1) - log_det

    with matmul_tf32(device, tf32):
        train = images_per_second(train_step, batch, device, warmup, iters)
        infer = images_per_second(infer_step, batch, device, warmup, iters)
    return {"train_images_per_s": train, "infer_images_per_s": infer}


def two_task_flow(config: AblationConfig, dim: int, device: torch.device) -> nn.Module:
    """Our flow of ``config`` (seed 0) with tasks 0 and 1 added, on ``device``."""
    torch.manual_seed(0)
    model = build_flow(config, dim).to(device)
    model.add_task()
    model.add_task()
    return model


def training_step(model: nn.Module, config: AblationConfig, task: int, x: Tensor, device: torch.device,
                  graphs: bool = False, on_failure: Optional[Callable[[str], None]] = None) -> Callable[[], None]:
    """A training step of ``task`` on the fixed batch ``x``, the trainer's own (``trainer/steps.py``):
    task 0 trains every parameter, a later task only its own; on CUDA the fused, sync-free step,
    recorded as a CUDA graph with ``graphs``. Leaves the model in training mode."""
    trainer = build_trainer(config, model, device, logging.getLogger(__name__))
    params = trainer.trainable(task, slow=False)
    strategy = steps.Strategy.for_device(device, graphs)
    optimizer = steps.make_optimizer(config.optimizer, params, 1e-5, config.weight_decay, strategy, device)
    step = steps.make_step(strategy, lambda feats: trainer.loss(feats, task), optimizer, params, config.grad_clip,
                           x.shape[0], device, on_failure=on_failure)
    model.train()
    return lambda: step(x)


def our_flow_throughput(device: torch.device, config: AblationConfig, dim: int, grid: tuple[int, int],
                        train_batch: int, infer_batch: int, tf32: bool, warmup: int = 3,
                        iters: int = 10) -> dict[str, float]:
    """Our flow alone: training steps of task 0 and task 1 (no CUDA graph) and inference."""
    model = two_task_flow(config, dim, device)
    out: dict[str, float] = {}
    x = torch.randn(train_batch, *grid, dim, device=device)
    with matmul_tf32(device, tf32):
        for task in (0, 1):
            step = training_step(model, config, task, x, device)
            out[f"train_task{task}_images_per_s"] = images_per_second(step, train_batch, device, warmup, iters)
        model.eval()
        model.requires_grad_(False)
        xi = torch.randn(infer_batch, *grid, dim, device=device)

        @torch.no_grad()
        def infer_step() -> object:
            z, log_det = model(xi, 1)
            return patch_nll(z, log_det)

        out["infer_images_per_s"] = images_per_second(infer_step, infer_batch, device, warmup, iters)
    return out


def flow_step_diagnostics(device: torch.device, config: AblationConfig, dim: int, grid: tuple[int, int],
                          batch: int, tf32: bool, iters: int = 20) -> dict[str, object]:
    """Our flow's task-1 training step (frozen base), launched kernel by kernel and (CUDA) replayed as
    the trainer's recorded CUDA graph: the difference is the step's Python and launch overhead."""
    out: dict[str, object] = {}
    x = torch.randn(batch, *grid, dim, device=device)
    failures: list[str] = []
    with matmul_tf32(device, tf32):
        for key, graphs in (("eager", False), ("cuda_graph", True)):
            if graphs and device.type != "cuda":
                break
            model = two_task_flow(config, dim, device)
            step = training_step(model, config, 1, x, device, graphs=graphs, on_failure=failures.append)
            out[f"{key}_images_per_s"] = images_per_second(step, batch, device, 3, iters)
    if failures:
        out["cuda_graph_error"] = failures[0][:300]
    return out


def measure_limits(device: torch.device, config: AblationConfig, quick: bool = False) -> dict:
    """All limits and our flow alone, as one JSON-ready dict (``quick``: 1 warm-up, 1 step each)."""
    extractor = build_backbone(config, torch.device("cpu"), weights="random")  # feature_dim 0: the width it picks
    grid, dim = tuple(extractor.grid_size()), extractor.feature_dim
    reps = {"warmup": 1, "iters": 1} if quick else {}
    batch = 2 if quick else 64
    precisions = {"fp32": False, "tf32": True} if device.type == "cuda" else {"fp32": False}
    result: dict = {"batch": batch}
    result["backbone_fp32_images_per_s"] = backbone_limit(device, config.backbone_name, batch, config.img_size, **reps)
    if device.type == "cuda":
        result["backbone_bf16_channels_last_images_per_s"] = backbone_limit(device, config.backbone_name, batch,
                                                                            config.img_size, bf16=True, **reps)
    if grid[0] != grid[1]:
        raise ValueError(f"the reference flow is measured on square grids, got {grid}")
    ref_blocks = 8
    result["reference_flow"] = {"blocks": ref_blocks, "dim": dim, "grid": list(grid)}
    for label, tf32 in precisions.items():
        result["reference_flow"][label] = reference_flow_limits(device, dim, grid[0], ref_blocks, batch, tf32, **reps)
    ours: dict = {}
    for label, tf32 in precisions.items():
        for train_batch in sorted({config.batch_size, batch}):
            ours[f"{label}_train_batch{train_batch}"] = our_flow_throughput(
                device, config, dim, grid, train_batch, max(batch, 2 * config.batch_size), tf32, **reps)
    result["our_flow"] = ours
    result["our_flow_task1_step_diagnostics"] = {
        f"{label}_batch{config.batch_size}": flow_step_diagnostics(
            device, config, dim, grid, config.batch_size, tf32, iters=reps.get("iters", 20))
        for label, tf32 in precisions.items()}
    return result
