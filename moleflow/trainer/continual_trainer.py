"""MoLEContinualTrainer: trains one task at a time on cached features.

Task 0 trains everything (shared base + its own expert). From task 1 on, with the base frozen,
a task trains only its LoRA experts, task biases, adapter and DIA blocks. The optional SLOW
stage unfreezes the last ``slow_blocks_k`` shared blocks for the final epochs of a later task.

On CUDA a training step never waits for the GPU: the optimizer is the fused AdamW/Adam with its
learning rate in a device tensor, a batch with a non-finite loss is skipped on the device (the
fused step's ``found_inf`` leaves parameters and optimizer state untouched, exactly as not
stepping), and losses and skip counts are summed on the device and read once per epoch. With
``cuda_graphs`` (default) the full-batch step is recorded once per task and stage as a CUDA graph
and replayed (``graph_step.py``: the same kernels, without a Python launch for each). On the CPU
the loop is the plain one. ``tf32=True`` lets the flow's float32 matrix products use TF32 on CUDA.

Under ``--compile_flow`` the first task trains unfused: it is the only task whose shared weights
train, so its compiled graph would serve one task and takes longer to compile than fusion saves
on it (docs/performance.md). Later tasks share one
compiled graph (frozen base), compiled for the exact shape of a full batch; a smaller last batch
runs unfused. With ``compile_ahead`` (default) a child process compiles that graph into torch's
on-disk caches while task 0 trains (``precompile.py``), and the run loads it at task 1.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from moleflow.config.ablation import AblationConfig
from moleflow.models import fusion
from moleflow.models.loss import moleflow_loss
from moleflow.models.mole_nf import MoLESpatialAwareNF
from moleflow.models.routing import PrototypeRouter
from moleflow.trainer import precompile
from moleflow.trainer.features import FeatureSet
from moleflow.trainer.graph_step import GraphedStep, StepBody
from moleflow.trainer.precision import matmul_tf32


class TrainingError(RuntimeError):
    """Training cannot produce a usable model (e.g. too many non-finite batches)."""


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


@contextlib.contextmanager
def _step_fusion(full_batch: bool) -> Iterator[None]:
    """Under ``--compile_flow``: a full batch runs the graph compiled for its exact shape (one per
    run, shared by all later tasks); a smaller last batch runs unfused (its size differs from task to
    task, and compiling for each size would cost more than the few unfused steps)."""
    with fusion.static_shapes(full_batch), fusion.paused(not full_batch):
        yield


class MoLEContinualTrainer:
    """Owns the model and the router and trains them task after task.

    Args:
        config: run settings.
        model: the flow (tasks are added by ``train_task``).
        router: prototype router (a prototype is added per task).
        device: where the flow trains.
        logger: run logger (training.log).
        progress: show tqdm bars.
        tf32: on CUDA, let the flow's float32 matrix products use TF32.

    Attributes:
        fused: use the fused optimizer (default: on CUDA).
        sync_free: skip non-finite batches on the device, without a host sync per step (needs
            ``fused``; default: on CUDA).
        graphs: run full-batch steps through ``GraphedStep`` (needs ``sync_free``; default: on CUDA
            with ``config.cuda_graphs``). Off CUDA the step runs on the same fixed input buffer
            without being recorded (how the tests check this path on a CPU).
        compile_ahead: what the compile-ahead child reported (``precompile.AheadCompile.wait``), once
            task 1 has started; None if no child ran or it failed.
    """

    def __init__(self, config: AblationConfig, model: MoLESpatialAwareNF, router: PrototypeRouter,
                 device: torch.device, logger: logging.Logger, progress: bool = True, tf32: bool = False) -> None:
        self.config = config
        self.model = model
        self.router = router
        self.device = device
        self.log = logger
        self.progress = progress
        self.tf32 = tf32
        self.fused = device.type == "cuda"
        self.sync_free = self.fused
        self.graphs = self.sync_free and config.cuda_graphs
        self.compile_ahead: Optional[dict] = None
        self._ahead: Optional[precompile.AheadCompile] = None
        # sync-free path: (sum of finite losses, skipped batches) of the epoch, kept on the device
        self._sums = (torch.zeros((), dtype=torch.float64, device=device),
                      torch.zeros((), dtype=torch.long, device=device))

    def _trainable(self, task_id: int, slow: bool) -> list[nn.Parameter]:
        """Set requires_grad for this task's stage and return the parameters to optimise."""
        shared = self.model.shared_parameters()
        own = self.model.task_parameters(task_id)
        train_shared = task_id == 0 or not self.config.freeze_base
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = own + (shared if train_shared else [])
        if slow:
            params = params + self.model.slow_parameters(self.config.slow_blocks_k)
        unique = list({id(p): p for p in params}.values())
        for p in unique:
            p.requires_grad_(True)
        return unique

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        # adamw: decoupled decay (p -= lr * wd * p); adam: wd * p added to the gradient (L2)
        cls = torch.optim.AdamW if self.config.optimizer == "adamw" else torch.optim.Adam
        kwargs: dict = {"weight_decay": self.config.weight_decay}
        lr: float | Tensor = self.config.lr
        if self.fused:
            kwargs["fused"] = True
        if self.sync_free:  # the rate lives on the device and is filled before each step
            lr = self._lr_tensor(self.config.lr)
            kwargs["capturable"] = self.graphs  # the fused step ignores it; recording checks it
        opt = cls([{"params": params, "base_lr": self.config.lr}], lr=lr, **kwargs)
        # A small last batch steps without the graph; with capturable=True torch would warn once.
        opt._warned_capturable_if_run_uncaptured = True
        return opt

    def _lr_tensor(self, value: float) -> Tensor:
        """A learning rate the fused step reads from memory: float32 on CUDA (the only dtype its
        kernel reads), float64 elsewhere (read as the double a Python float would give)."""
        dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        return torch.tensor(value, dtype=dtype, device=self.device)

    @staticmethod
    def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
        for group in optimizer.param_groups:
            value = group["base_lr"] * factor
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(value)
            else:
                group["lr"] = value

    def train_task(self, task_id: int, train: FeatureSet,
                   refresh: Optional[Callable[[], FeatureSet]] = None) -> TaskStats:
        """Add task ``task_id`` to the model and router and train it.

        Args:
            task_id: must equal the number of tasks already trained.
            train: cached training features of the task (all its classes, no augmentation); the
                router prototype is always estimated from these.
            refresh: with augmentation on, returns freshly augmented features; called before
                every epoch after the first (the backbone is re-run on new augmentations).
        """
        router_features = train.router
        cfg = self.config
        if task_id != self.model.num_tasks:
            raise ValueError(f"task {task_id} cannot follow {self.model.num_tasks} trained tasks")
        torch.manual_seed(cfg.seed * 7919 + task_id)
        self.model.add_task()
        params = self._trainable(task_id, slow=False)
        n_params = sum(p.numel() for p in params)
        self.log.info(f"task {task_id}: {len(train)} training images, trainable parameters {n_params:,} "
                      f"(shared {'trained' if task_id == 0 or not cfg.freeze_base else 'frozen'})")
        if self.fused:
            self.log.info(f"task {task_id}: fused {cfg.optimizer}, non-finite batches skipped on the device, "
                          f"flow matmuls {'TF32' if self.tf32 else 'float32'}", extra={"file_only": True})
        optimizer = self._optimizer(params)
        if self._ahead is not None:  # this task's compiled training step is (about to be) on disk
            self.compile_ahead = self._ahead.wait(self.log)
            self._ahead = None
        elif task_id == 0 and cfg.compile_ahead and fusion.active(self.device):
            self._ahead = precompile.start(cfg, (cfg.batch_size, *train.patches.shape[1:]), self.device, self.tf32)
        n = len(train)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total = cfg.num_epochs * steps_per_epoch
        warmup = cfg.warmup_epochs * steps_per_epoch if task_id > 0 else 0
        warmup = min(warmup, total - 1) if total > 1 else 0
        slow_epoch = math.ceil(cfg.slow_stage_start * cfg.num_epochs)
        use_slow = cfg.enable_slow_stage and task_id > 0 and slow_epoch < cfg.num_epochs
        generator = torch.Generator().manual_seed(cfg.seed * 104729 + task_id)
        step, skipped, last_loss = 0, 0, float("nan")
        runner: Optional[GraphedStep] = None
        self.model.train()
        bar = tqdm(range(cfg.num_epochs), desc=f"task {task_id} train", leave=False, disable=not self.progress)
        for epoch in bar:
            if use_slow and epoch == slow_epoch:
                slow = self.model.slow_parameters(cfg.slow_blocks_k)
                self._trainable(task_id, slow=True)
                slow_lr = cfg.lr * cfg.slow_lr_ratio
                lr_value = self._lr_tensor(slow_lr) if self.sync_free else slow_lr
                optimizer.add_param_group({"params": slow, "base_lr": slow_lr, "lr": lr_value})
                params = params + slow
                runner = None  # the recorded step holds the old parameter set
                self.log.info(f"task {task_id}: SLOW stage from epoch {epoch + 1}: last {cfg.slow_blocks_k} "
                              f"shared blocks unfrozen at lr x {cfg.slow_lr_ratio}")
            if refresh is not None and epoch > 0:
                train = refresh()
            order = torch.randperm(n, generator=generator).to(train.patches.device)
            if self.graphs and runner is None:
                runner = GraphedStep(self._sync_free_body(task_id, optimizer, params),
                                     (cfg.batch_size, *train.patches.shape[1:]), self.device,
                                     capture=self.device.type == "cuda", on_failure=self.log.warning)
            with self._task_compute(task_id):
                loss_sum, good, bad = self._epoch(task_id, train, order, optimizer, params, step, total, warmup,
                                                  runner)
            step += good + bad
            skipped += bad
            if skipped > cfg.max_skip_fraction * step:
                raise TrainingError(
                    f"task {task_id}: {skipped} of {step} batches had a non-finite loss (limit "
                    f"{cfg.max_skip_fraction:.0%}); lower --lr or check the features; earlier tasks' "
                    f"checkpoint stays usable")
            last_loss = loss_sum / good if good else float("nan")
            bar.set_postfix(loss=f"{last_loss:.2f}")
            self.log.info(f"task {task_id} epoch {epoch + 1}/{cfg.num_epochs} loss {last_loss:.4f} "
                          f"lr {float(optimizer.param_groups[0]['lr']):.2e} skipped {skipped}", extra={"file_only": True})
        optimizer.zero_grad(set_to_none=True)
        if runner is not None and runner.graph is not None:
            # A recorded step keeps a private memory pool that the allocator hands back only on
            # request; without this every task would leave its pool reserved.
            del runner
            torch.cuda.empty_cache()
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.router.add_task(router_features)
        return TaskStats(task_id, cfg.num_epochs, step, skipped, last_loss, n_params)

    def _epoch(self, task_id: int, train: FeatureSet, order: Tensor, optimizer: torch.optim.Optimizer,
               params: list[nn.Parameter], step: int, total: int, warmup: int,
               runner: Optional[GraphedStep] = None) -> tuple[float, int, int]:
        """One pass over ``train`` in ``order``; returns (sum of finite losses, good batches, skipped).

        Sync-free (CUDA): every batch steps, and a non-finite one is neutralised on the device through
        the fused step's ``found_inf``; losses and skips are summed on the device. Full batches go
        through ``runner`` when given (a recorded step), a smaller last batch runs the same body
        directly. Plain: a non-finite batch is detected on the host and not stepped.
        """
        cfg = self.config
        host_loss_sum, skipped, batches = 0.0, 0, 0
        if self.sync_free:
            self._sums[0].zero_()
            self._sums[1].zero_()
            body = runner.body if runner is not None else self._sync_free_body(task_id, optimizer, params)
        for start in range(0, len(order), cfg.batch_size):
            self._set_lr(optimizer, lr_factor(step + batches, total, warmup))
            batches += 1
            index = order[start:start + cfg.batch_size]
            full = len(index) == cfg.batch_size
            if self.sync_free:
                feats = train.patches[index]
                with _step_fusion(full):
                    if runner is not None and full:
                        runner(feats)
                    else:
                        body(feats.to(self.device, non_blocking=True), False)
                continue
            with _step_fusion(full):
                loss = self._loss(train.patches[index].to(self.device), task_id)
            if not torch.isfinite(loss):
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                continue
            self._update(loss, optimizer, params)
            host_loss_sum += loss.item()
        if not self.sync_free:
            return host_loss_sum, batches - skipped, skipped
        if hasattr(optimizer, "found_inf"):  # an empty epoch never set it
            del optimizer.found_inf
        skipped = int(self._sums[1])
        return float(self._sums[0]), batches - skipped, skipped

    def _sync_free_body(self, task_id: int, optimizer: torch.optim.Optimizer,
                        params: list[nn.Parameter]) -> StepBody:
        """One training step that never reads a value back to the host (see ``GraphedStep``).

        ``dry=True`` computes everything but, through ``found_inf = 1``, changes no parameter,
        optimizer moment or step count, and leaves the loss and skip sums alone.
        """
        loss_sum, bad_sum = self._sums

        def body(feats: Tensor, dry: bool) -> None:
            loss = self._loss(feats, task_id)
            bad = ~torch.isfinite(loss)
            optimizer.found_inf = torch.ones_like(loss) if dry else bad.float()
            self._update(loss, optimizer, params)
            if not dry:
                loss_sum.add_(torch.where(bad, 0.0, loss.detach().double()))
                bad_sum.add_(bad)

        return body

    @contextlib.contextmanager
    def _task_compute(self, task_id: int) -> Iterator[None]:
        """How ``task_id`` trains: its matrix products' precision, fused or not (task 0 unfused)."""
        with matmul_tf32(self.device, self.tf32), fusion.paused(task_id == 0):
            yield

    def trace_step(self, task_id: int, batch_shape: tuple[int, ...]) -> None:
        """One training forward and backward of ``task_id`` (already added to the model) on random
        features of a full batch of ``batch_shape``, with the trainable set, precision and fusion of
        ``train_task``; updates nothing. Under ``--compile_flow`` it compiles what that task's first
        step would compile (the compile-ahead child's work)."""
        params = self._trainable(task_id, slow=False)
        self.model.train()
        feats = torch.randn(batch_shape, device=self.device)
        with self._task_compute(task_id), _step_fusion(True):
            self._loss(feats, task_id).backward()
        self.model.eval()
        for p in params:
            p.grad = None
            p.requires_grad_(False)

    def _update(self, loss: Tensor, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        optimizer.step()

    def _loss(self, feats: Tensor, task_id: int) -> Tensor:
        cfg = self.config
        z, log_det = self.model(feats, task_id)
        return moleflow_loss(z, log_det, tail_weight=cfg.tail_weight, tail_ratio=cfg.tail_top_k_ratio,
                             lambda_logdet=cfg.lambda_logdet, tail_aware=cfg.use_tail_aware_loss)
