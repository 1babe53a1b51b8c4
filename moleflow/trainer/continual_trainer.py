"""MoLEContinualTrainer: trains the flow one task at a time on cached features.

Task 0 trains everything (shared base + its own expert). From task 1 on, with the base frozen,
a task trains only its LoRA experts, task biases, adapter and DIA weights. The optional SLOW
stage unfreezes the last ``slow_blocks_k`` shared blocks for the final epochs of a later task.
Each task: AdamW (or Adam), cosine schedule over its epochs, 2 warm-up epochs for tasks > 0,
global gradient clip; a batch whose loss is not finite is skipped and counted, and too many of
them stop the task. How a step runs on the device (plain, sync-free, CUDA graph, compiled) is
chosen once, in ``steps.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from moleflow.extractors.features import FeatureSet
from moleflow.models.loss import moleflow_loss
from moleflow.models.mole_nf import MoLESpatialAwareNF
from moleflow.distributed import world
from moleflow.trainer import ddp, steps


class TrainingError(RuntimeError):
    """Training cannot produce a usable model (e.g. too many non-finite batches)."""


@dataclass(frozen=True)
class TrainSettings:
    """What the trainer needs to know; the fields are the ``AblationConfig`` settings of the same
    names (``moleflow.build.train_settings``)."""

    num_epochs: int
    lr: float
    batch_size: int
    optimizer: str
    weight_decay: float
    grad_clip: float
    warmup_epochs: int
    max_skip_fraction: float
    use_tail_aware_loss: bool
    tail_weight: float
    tail_top_k_ratio: float
    lambda_logdet: float
    freeze_base: bool
    enable_slow_stage: bool
    slow_blocks_k: int
    slow_lr_ratio: float
    slow_stage_start: float
    seed: int
    tf32: bool
    cuda_graphs: bool


@dataclass
class TaskStats:
    """What training one task did."""

    task_id: int
    epochs: int
    steps: int
    skipped_batches: int
    final_loss: float
    trainable_params: int


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class MoLEContinualTrainer:
    """Trains the flow task after task.

    Args:
        settings: training settings.
        model: the flow (tasks are added by ``train_task``).
        device: where the flow trains.
        logger: run logger (training.log).
        progress: show tqdm bars.

    Attributes:
        strategy: how a step runs (``steps.Strategy``; on CUDA fused, sync-free and recorded as a
            CUDA graph with ``cuda_graphs``, the plain step elsewhere).
    """

    def __init__(self, settings: TrainSettings, model: MoLESpatialAwareNF, device: torch.device,
                 logger: logging.Logger, progress: bool = True) -> None:
        self.settings = settings
        self.model = model
        self.device = device
        self.log = logger
        self.progress = progress
        # DDP's gradient hooks are not recorded into a CUDA graph: under torchrun steps run unrecorded
        self.strategy = steps.Strategy.for_device(device, settings.cuda_graphs and not world().active)

    def trainable(self, task_id: int, slow: bool) -> list[nn.Parameter]:
        """Set requires_grad for this task's stage and return the parameters to optimise: its own,
        the shared ones on task 0 (or always, without ``freeze_base``), the last shared blocks in
        the SLOW stage."""
        s = self.settings
        params = self.model.task_parameters(task_id)
        if task_id == 0 or not s.freeze_base:
            params = params + self.model.shared_parameters()
        if slow:
            params = params + self.model.slow_parameters(s.slow_blocks_k)
        unique = list({id(p): p for p in params}.values())
        self.model.requires_grad_(False)
        for p in unique:
            p.requires_grad_(True)
        return unique

    def loss(self, feats: Tensor, task_id: int, flow: Optional[nn.Module] = None) -> Tensor:
        """The training loss of task ``task_id`` on (B, H, W, D) features, through ``flow`` when given
        (the model under DistributedDataParallel), else through the model."""
        s = self.settings
        z, log_det = (self.model if flow is None else flow)(feats, task_id)
        return moleflow_loss(z, log_det, tail_weight=s.tail_weight, tail_ratio=s.tail_top_k_ratio,
                             lambda_logdet=s.lambda_logdet, tail_aware=s.use_tail_aware_loss)

    def train_task(self, task_id: int, train: FeatureSet,
                   refresh: Optional[Callable[[], FeatureSet]] = None) -> TaskStats:
        """Add task ``task_id`` to the model and train it.

        Args:
            task_id: must equal the number of tasks already trained.
            train: cached training features of the task (all its classes, no augmentation).
            refresh: with augmentation on, returns freshly augmented features; called before
                every epoch after the first (the backbone is re-run on new augmentations).
        """
        s = self.settings
        if task_id != self.model.num_tasks:
            raise ValueError(f"task {task_id} cannot follow {self.model.num_tasks} trained tasks")
        torch.manual_seed(s.seed * 7919 + task_id)
        self.model.add_task()
        params = self.trainable(task_id, slow=False)
        n_params = sum(p.numel() for p in params)
        self.log.info(f"task {task_id}: {len(train)} training images, trainable parameters {n_params:,} "
                      f"(shared {'trained' if task_id == 0 or not s.freeze_base else 'frozen'})")
        if self.strategy.fused:
            self.log.info(f"task {task_id}: fused {s.optimizer}, non-finite batches skipped on the device, "
                          f"flow matmuls {'TF32' if s.tf32 else 'float32'}", extra={"file_only": True})
        optimizer = steps.make_optimizer(s.optimizer, params, s.lr, s.weight_decay, self.strategy, self.device)
        n = len(train)
        per_epoch = math.ceil(n / s.batch_size)
        total = s.num_epochs * per_epoch
        warmup = min(s.warmup_epochs * per_epoch, total - 1) if task_id > 0 and total > 1 else 0
        slow_epoch = math.ceil(s.slow_stage_start * s.num_epochs)
        use_slow = s.enable_slow_stage and task_id > 0 and slow_epoch < s.num_epochs
        generator = torch.Generator().manual_seed(s.seed * 104729 + task_id)
        step = self._step(task_id, optimizer, params)
        done, skipped, last_loss = 0, 0, float("nan")
        self.model.train()
        bar = tqdm(range(s.num_epochs), desc=f"task {task_id} train", leave=False, disable=not self.progress)
        for epoch in bar:
            if use_slow and epoch == slow_epoch:
                slow = self.model.slow_parameters(s.slow_blocks_k)
                self.trainable(task_id, slow=True)
                slow_lr = s.lr * s.slow_lr_ratio
                optimizer.add_param_group({"params": slow, "base_lr": slow_lr,
                                           "lr": steps.lr_value(slow_lr, self.strategy, self.device)})
                params = params + slow
                step = self._step(task_id, optimizer, params)  # a recorded step holds the old parameter set
                self.log.info(f"task {task_id}: SLOW stage from epoch {epoch + 1}: last {s.slow_blocks_k} "
                              f"shared blocks unfrozen at lr x {s.slow_lr_ratio}")
            if refresh is not None and epoch > 0:
                train = refresh()
            order = torch.randperm(n, generator=generator).to(train.patches.device)
            with steps.task_compute(self.device, s.tf32, task_id):
                for start in range(0, n, s.batch_size):
                    steps.set_lr(optimizer, lr_factor(done + start // s.batch_size, total, warmup))
                    step(train.patches[order[start:start + s.batch_size]])
            loss_sum, good, bad = step.end_epoch()
            done, skipped = done + good + bad, skipped + bad
            if skipped > s.max_skip_fraction * done:
                raise TrainingError(
                    f"task {task_id}: {skipped} of {done} batches had a non-finite loss (limit "
                    f"{s.max_skip_fraction:.0%}); lower --lr or check the features; earlier tasks' "
                    f"checkpoint stays usable")
            last_loss = loss_sum / good if good else float("nan")
            bar.set_postfix(loss=f"{last_loss:.2f}")
            self.log.info(f"task {task_id} epoch {epoch + 1}/{s.num_epochs} loss {last_loss:.4f} "
                          f"lr {float(optimizer.param_groups[0]['lr']):.2e} skipped {skipped}", extra={"file_only": True})
        step.close()
        self.model.eval()
        self.model.requires_grad_(False)
        return TaskStats(task_id, s.num_epochs, done, skipped, last_loss, n_params)

    def _step(self, task_id: int, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> steps.PlainStep:
        # under torchrun: DDP over the current trainable set, each process a slice of the batch (ddp.py)
        flow = ddp.wrap(self.model, self.device)
        loss_fn = ddp.sharded_loss(lambda feats: self.loss(feats, task_id, flow))
        return steps.make_step(self.strategy, loss_fn, optimizer, params,
                               self.settings.grad_clip, self.settings.batch_size, self.device,
                               on_failure=self.log.warning)

    def trace_step(self, task_id: int, batch_shape: tuple[int, ...]) -> None:
        """One training forward and backward of ``task_id`` (already added) on random features of a full
        batch of ``batch_shape``, set up as ``train_task`` would; updates nothing. Under ``--compile_flow``
        it compiles what that task's first step would (the compile-ahead child's work)."""
        params = self.trainable(task_id, slow=False)
        self.model.train()
        feats = torch.randn(batch_shape, device=self.device)
        with steps.task_compute(self.device, self.settings.tf32, task_id), steps.step_fusion(True):
            self.loss(feats, task_id).backward()
        self.model.eval()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
