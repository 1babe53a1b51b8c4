"""MoLESpatialAwareNF: the whole per-patch density model of MoLE-Flow.

features (B, H, W, D)
  -> + 2-D positional encoding                      (fixed)
  -> input adapter of task t                        (per task)
  -> spatial context mixer                          (shared)
  -> N MoLE coupling blocks with LoRA expert t      (shared base, per-task experts)
  -> DIA blocks of task t                           (per task)
  -> z (B, H, W, D), log|det J| (B, H, W)

The first three steps condition the input; the coupling and DIA blocks are the invertible
flow whose log-determinant enters the likelihood. ``task`` is an int or, for the forward pass, a
``(B,)`` tensor of task ids, one per image (``experts.py``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from moleflow.models import experts
from moleflow.models.adapters import FiLMAdapter, SpatialContextMixer, WhiteningAdapter, positional_encoding_2d
from moleflow.models.coupling import DIABlock, DIASubnet, MoLECouplingBlock, coupling_forward, dia_forward
from moleflow.models.experts import Task
from moleflow.models.fusion import fusable
from moleflow.models.lora import LoRALinear

ADAPTERS = {"whitening": WhiteningAdapter, "film": FiLMAdapter}


@fusable
def condition_forward(x: Tensor, pos: Optional[Tensor], adapt: Optional[Callable[[Tensor, Sequence[Tensor]], Tensor]],
                      params: Sequence[Tensor], mixer: Optional[nn.Module]) -> Tensor:
    """Input stage: + positional encoding, ``adapt`` with its picked ``params``, spatial mixer."""
    if pos is not None:
        x = x + pos
    if adapt is not None:
        x = adapt(x, params)
    return mixer(x) if mixer is not None else x


class MoLESpatialAwareNF(nn.Module):
    """Normalizing flow over patch features with one LoRA expert, adapter and DIA per task.

    Args:
        dim: D, the patch-feature width (divisible by 4 when the positional encoding is on).
        num_coupling_layers: shared MoLE blocks.
        lora_rank: LoRA rank, 0 = no LoRA.
        lora_alpha: LoRA alpha.
        clamp: soft clamp of the coupling log-scales.
        scale_context_kernel: depthwise kernel of the subnets' scale branch, 0 = off.
        spatial_context_kernel: kernel of the shared mixer, 0 = off.
        use_pos_embed: add the 2-D sinusoidal encoding.
        adapter: 'whitening', 'film' or None (no per-task adapter).
        dia_n_blocks: per-task DIA blocks, 0 = off.
        dia_hidden_ratio: DIA MLP width as a fraction of D.
        seed: seed of the fixed permutations.
    """

    def __init__(self, dim: int, num_coupling_layers: int = 6, lora_rank: int = 64, lora_alpha: float = 1.0,
                 clamp: float = 1.9, scale_context_kernel: int = 5, spatial_context_kernel: int = 3,
                 use_pos_embed: bool = True, adapter: Optional[str] = "whitening", dia_n_blocks: int = 2,
                 dia_hidden_ratio: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if adapter is not None and adapter not in ADAPTERS:
            raise ValueError(f"adapter must be 'whitening', 'film' or None, got {adapter!r}")
        self.dim = dim
        self.use_pos_embed = use_pos_embed
        self.adapter_kind = adapter
        self.dia_n_blocks = dia_n_blocks
        self.dia_hidden = max(1, int(round(dia_hidden_ratio * dim)))
        self.mixer = SpatialContextMixer(dim, spatial_context_kernel) if spatial_context_kernel > 0 else None
        self.blocks = nn.ModuleList(
            MoLECouplingBlock(dim, lora_rank, lora_alpha, clamp, scale_context_kernel, permutation_seed=seed * 1000 + i)
            for i in range(num_coupling_layers)
        )
        self.dia_blocks = nn.ModuleList(DIABlock(dim, clamp, swap=(k % 2 == 1)) for k in range(dia_n_blocks))
        self.adapters = nn.ModuleList()  # per task
        self.dia = nn.ModuleList()  # per task: one DIASubnet (its weights) per DIA block
        # The buffer records the task count in checkpoints; the host-side copy is what the passes
        # read (reading a CUDA buffer with int() would wait for the GPU in every forward pass).
        # A model is always grown with add_task() before a checkpoint is loaded into it.
        self.register_buffer("_num_tasks", torch.zeros((), dtype=torch.long))
        self._task_count = 0
        self._pos_cache: dict[tuple[int, int, str], Tensor] = {}

    # ----------------------------------------------------------------- tasks and parameters
    @property
    def num_tasks(self) -> int:
        return self._task_count

    def lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def add_task(self) -> int:
        """Create the next task's expert, adapter and DIA blocks; return its task id.

        A new expert starts as the base: zero B and task bias, identity DIA, and an adapter at
        gamma ~ 1 (task 0) or gamma = 1.25 (later tasks, gamma_raw = 0), beta = 0.
        """
        task_id = self.num_tasks
        for layer in self.lora_layers():
            layer.add_expert()
        ref = next(self.blocks.parameters())
        device, dtype = ref.device, ref.dtype
        if self.adapter_kind == "whitening":
            self.adapters.append(WhiteningAdapter(self.dim, gamma_raw_init=-0.7 if task_id == 0 else 0.0).to(device, dtype))
        elif self.adapter_kind == "film":
            self.adapters.append(FiLMAdapter(self.dim).to(device, dtype))
        if self.dia_n_blocks > 0:
            self.dia.append(nn.ModuleList(DIASubnet(b.split, self.dim - b.split, self.dia_hidden)
                                          for b in self.dia_blocks).to(device, dtype))
        self._num_tasks += 1
        self._task_count += 1
        return task_id

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        """Parameters owned by ``task_id``: LoRA A, B, task bias; adapter; DIA weights."""
        params: list[nn.Parameter] = []
        for layer in self.lora_layers():
            params.extend(layer.expert_parameters(task_id))
        if self.adapter_kind is not None:
            params.extend(self.adapters[task_id].parameters())
        if self.dia_n_blocks > 0:
            params.extend(self.dia[task_id].parameters())
        return params

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters used by every task (coupling base weights, context convs and gains, mixer)."""
        owned = {id(p) for t in range(self.num_tasks) for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in owned]

    def slow_parameters(self, last_k: int) -> list[nn.Parameter]:
        """Shared base parameters of the last ``last_k`` coupling blocks (SLOW stage)."""
        owned = {id(p) for t in range(self.num_tasks) for p in self.task_parameters(t)}
        return [p for block in self.blocks[-last_k:] for p in block.parameters() if id(p) not in owned]

    # ----------------------------------------------------------------------------- passes
    def _positional(self, height: int, width: int, ref: Tensor) -> Tensor:
        key = (height, width, str(ref.device))
        if key not in self._pos_cache:
            self._pos_cache[key] = positional_encoding_2d(height, width, self.dim).to(ref.device)
        return self._pos_cache[key].to(ref.dtype)

    def condition(self, features: Tensor, task: Task) -> Tensor:
        """Input stage: positional encoding, adapter of ``task``, spatial mixer.

        Args:
            features: (B, H, W, D) backbone patch features.

        Returns:
            (B, H, W, D) input of the invertible flow.
        """
        experts.check(task, self.num_tasks)
        pos = self._positional(features.shape[1], features.shape[2], features) if self.use_pos_embed else None
        if self.adapter_kind is None:
            return condition_forward(features, pos, None, (), self.mixer)
        return condition_forward(features, pos, ADAPTERS[self.adapter_kind].adapt,
                                 experts.select_params(self.adapters, task), self.mixer)

    def flow(self, x: Tensor, task: Task, rev: bool = False) -> tuple[Tensor, Tensor]:
        """The invertible part: MoLE blocks then DIA blocks (reverse order when ``rev``).

        Args:
            x: (B, H, W, D).
            task: expert / DIA owner, or a (B,) tensor of owners (forward only).
            rev: run the inverse.

        Returns:
            (out (B, H, W, D), log|det J| (B, H, W)) of the direction run.
        """
        experts.check(task, self.num_tasks, rev)
        log_det = torch.zeros(x.shape[:-1], device=x.device, dtype=x.dtype)
        if not rev:
            for block in self.blocks:
                x, ld = coupling_forward(x, block, block.subnet.experts(task))
                log_det = log_det + ld
            x, ld = self._dia(x, task, rev=False)
            return x, log_det + ld
        x, ld = self._dia(x, task, rev=True)
        log_det = log_det + ld
        for block in reversed(self.blocks):
            x, ld = block(x, block.subnet.experts(task), rev=True)
            log_det = log_det + ld
        return x, log_det

    def _dia(self, x: Tensor, task: Task, rev: bool) -> tuple[Tensor, Tensor]:
        """The DIA blocks with ``task``'s weights, on each patch vector."""
        shape = x.shape
        if self.dia_n_blocks == 0:
            return x, torch.zeros(shape[:-1], device=x.device, dtype=x.dtype)
        weights = [experts.select_params([subnets[k] for subnets in self.dia], task) for k in range(self.dia_n_blocks)]
        rows = experts.rows(x, task)
        if not rev:
            y, log_det = dia_forward(rows, self.dia_blocks, weights)
            return y.reshape(shape), log_det.reshape(shape[:-1])
        log_det = torch.zeros(rows.shape[:-1], device=x.device, dtype=x.dtype)
        for block, w in zip(reversed(self.dia_blocks), reversed(weights)):
            rows, ld = block(rows, w, rev=True)
            log_det = log_det + ld
        return rows.reshape(shape), log_det.reshape(shape[:-1])

    def forward(self, features: Tensor, task: Task) -> tuple[Tensor, Tensor]:
        """features (B, H, W, D) -> (z (B, H, W, D), log|det J| (B, H, W)); ``task``: an int, or a (B,)
        tensor with each image's task."""
        return self.flow(self.condition(features, task), task)
