"""Where does flow training spend its time in the run's own loop? (diagnostic, needs CUDA; prints)

python benchmarks/train_probe.py   (PROBE_DEVICE=cpu PROBE_DIM=32 PROBE_GRID=4 for a dry run)

Trains the main-configuration flow (D 768, 28x28 patches, batch 16, TF32, --compile_flow) with the
trainer itself (recorded CUDA-graph steps) on random patch features of 240 images per task, and
prints for each task the wall time of ``train_task`` and the time per step, so that compile time
(tasks 0 and 1) and the steady state (later tasks) are separated. Then profiles the steady-state
step's kernels (one eager call of the same fused body) grouped by kind. PROBE_VARIANTS names
model variants to time the same way after the current one (PROBE_ONLY: only those):
  ``unmerged``: each LoRA layer's low-rank term as two thin products (before session 5);
  ``dia``: the DIA s and t MLPs side by side;
  ``atenconv``: the context conv's input gradient by autograd's depthwise kernel (before session 6);
  ``mixer``: the spatial mixer's conv through the flipped-kernel gradient too;
  ``sortedperm`` / ``identityperm`` (timing only, they change the model): each block's permutation
  sorted within the halves it splits into / dropped;
  ``layoutopt`` / ``nolayoutopt``: Inductor's layout optimisation on / off;
  ``static``: every fused call compiled for its exact shapes (``dynamic=False``);
  ``evalfirst``: fused scoring at two batch sizes after task 0, as a run's evaluation does, so that
  the training graph compiled at task 1 has a symbolic batch size (what happens in a real run);
  ``thinwgrad``: with the base frozen, the LoRA factors' gradients as four thin products each
  instead of the merged weight's full gradient.
Session 5, call 1 (before the merged LoRA product): current 12.0 ms/step in the loop (11.0 ms of
kernels), merged 11.3 (10.1), merged + paired DIA 11.4 (10.4); call 3: merged with the depthwise
convolutions written as shifted sums under fusion 10.5 (9.3) vs ATen's 10.8 (9.6), at +11 s of
compiling and slower scoring, so not kept. Session 6, call 1: the context conv's input gradient as
the flipped kernel's convolution 9.82 (8.90) vs ``atenconv`` 10.54 (9.57); call 2 (variants since
removed): the merged weight built transposed and used through addmm 10.12 (8.93) vs 10.18 (8.91),
cuBLASLt as torch's preferred BLAS 10.86 (9.52): neither kept. Session 7 (results
2026-11-28_h200_s7_call*): call 1: ``mixer`` 9.85 (8.94), ``sortedperm`` 9.75 (8.84),
``identityperm`` 9.86 (8.83) vs current 9.85 (8.93): the permutation gathers cost about 0.1 ms;
call 6: ``nolayoutopt`` 8.91 (7.90) vs current 10.06 (8.91); call 8 (10 epochs per task):
``evalfirst_nolayoutopt`` 9.94 (8.59), ``evalfirst_static_nolayoutopt`` 9.34 (7.85), ``evalfirst``
10.07 (8.58): a run's training graph has a symbolic batch size (so the layout optimisation does not
apply), and its bias-gradient reductions are slower than with the batch size fixed. Session 8
(results 2026-11-29_h200_s8_call1, the trainer compiling its full-batch step for the exact shape):
``evalfirst`` 8.92 (7.78), ``evalfirst_thinwgrad`` 9.21 (7.78): the thin products were not kept.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from moleflow.benchmark.limits import sync
from moleflow.config.ablation import AblationConfig
from moleflow.models import fusion as fusion_module
from moleflow.models.fusion import fusion, reset_compiled
from moleflow.models.coupling import DIASubnet
from moleflow.models import lora
from moleflow.models.adapters import SpatialContextMixer
from moleflow.models.lora import LoRALinear
from moleflow.models.mole_nf import build_flow
from moleflow.models.routing import PrototypeRouter
from moleflow.trainer.continual_trainer import MoLEContinualTrainer
from moleflow.trainer.features import FeatureSet
from moleflow.trainer.precision import matmul_tf32


def unmerged_run_expert(self: LoRALinear, x: torch.Tensor, expert) -> torch.Tensor:
    """The form before session 5: the base product with both biases, then the low-rank term as two
    thin products accumulated into it (s B (A x))."""
    if expert is None:
        return self.base(x)
    lora_a, lora_b, task_bias = expert
    if lora_a.dim() == 3:
        return self._run_per_image(x, lora_a, lora_b, task_bias)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.addmm(self.base.bias + task_bias, flat, self.base.weight.t())
    out.addmm_(flat @ lora_a.t(), lora_b.t(), alpha=self.scaling)
    return out.view(*x.shape[:-1], out.shape[-1])


class _ThinGradLoRALinear(torch.autograd.Function):
    """The merged LoRA product (one product forward); backward with the base frozen takes A's and B's
    gradients as four thin products (rank r) instead of the full merged-weight gradient G^T X, which
    cuBLAS runs as a split-K product (K = the batch's patches)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, task_bias, scaling: float):
        merged = torch.addmm(weight, lora_b, lora_a, alpha=scaling)
        ctx.save_for_backward(x, merged, lora_a, lora_b)
        ctx.scaling = scaling
        return F.linear(x, merged, bias + task_bias)

    @staticmethod
    def backward(ctx, grad):
        x, merged, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        grad_x = (g @ merged).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:  # base trains: the full weight gradient, as autograd
            grad_w = g.t() @ flat
            grad_a = s * (lora_b.t() @ grad_w)
            grad_b = s * (grad_w @ lora_a.t())
        else:
            grad_b = s * (g.t() @ (flat @ lora_a.t()))
            grad_a = s * ((g @ lora_b).t() @ flat)
        grad_bias = g.sum(0) if (ctx.needs_input_grad[2] or ctx.needs_input_grad[5]) else None
        return (grad_x, grad_w, grad_bias if ctx.needs_input_grad[2] else None, grad_a, grad_b,
                grad_bias if ctx.needs_input_grad[5] else None, None)


def thin_grad_run_expert(self: LoRALinear, x: torch.Tensor, expert) -> torch.Tensor:
    """``run_expert`` through ``_ThinGradLoRALinear`` for a single expert (per-image path unchanged)."""
    if expert is None or expert[0].dim() == 3:
        return original_run_expert(self, x, expert)
    lora_a, lora_b, task_bias = expert
    return _ThinGradLoRALinear.apply(x, self.base.weight, self.base.bias, lora_a, lora_b, task_bias, self.scaling)


original_run_expert = LoRALinear.run_expert


def paired_dia_forward(self: DIASubnet, x: torch.Tensor) -> torch.Tensor:
    """The s and t MLPs side by side: one product for both first layers, batched products after."""
    s_net, t_net = self.s_net, self.t_net
    hidden = s_net[0].out_features
    h = F.relu(F.linear(x, torch.cat([s_net[0].weight, t_net[0].weight]), torch.cat([s_net[0].bias, t_net[0].bias])))
    h = h.view(-1, 2, hidden).transpose(0, 1)                                     # (2, N, h)
    for i, act in ((2, True), (4, False)):
        weight = torch.stack([s_net[i].weight, t_net[i].weight]).transpose(1, 2)  # (2, in, out)
        bias = torch.stack([s_net[i].bias, t_net[i].bias]).unsqueeze(1)           # (2, 1, out)
        h = torch.baddbmm(bias, h, weight)
        h = F.relu(h) if act else h
    return torch.cat([h[0] / self.clamp, h[1]], dim=-1)


def aten_depthwise_conv2d(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The context conv with autograd's own gradients (the form before session 6)."""
    return conv(x)


def flipped_mixer_forward(self: SpatialContextMixer, x: torch.Tensor) -> torch.Tensor:
    """The spatial mixer with its conv's input gradient as the flipped kernel's convolution."""
    g = torch.sigmoid(self.gate)
    mixed = lora.depthwise_conv2d(x.permute(0, 3, 1, 2), self.conv).permute(0, 2, 3, 1)
    return (1.0 - g) * x + g * mixed


def set_permutations(model, how: str) -> None:
    """Timing only (changes the model): ``sorted`` keeps each block's split of the channels but
    orders each half (the access pattern of a storage order that follows the split); ``identity``
    drops the permutation (contiguous reads: the bound on what the gather costs)."""
    for block in model.blocks:
        perm = block.perm
        if how == "sorted":
            perm = torch.cat([perm[:block.split1].sort().values, perm[block.split1:].sort().values])
        else:
            perm = torch.arange(len(perm), device=perm.device)
        block.perm.copy_(perm)
        block.perm_inv.copy_(torch.argsort(perm))


def kind(name: str) -> str:
    n = name.lower()
    if "gemm" in n or "xmma" in n or "cutlass" in n or "gemv" in n or "splitk" in n:
        return "matmul"
    if n.startswith("triton"):
        return "triton (fused)"
    if "conv" in n or "depthwise" in n or "cudnn" in n or "implicit" in n:
        return "conv"
    if "reduce" in n or "norm" in n:
        return "reduce"
    if "adam" in n or "foreach" in n or "multi_tensor" in n:
        return "optimizer/foreach"
    if "memcpy" in n or "memset" in n:
        return "copy/set"
    return "other element-wise"


def profile_body(body, feats: torch.Tensor, reps: int = 5) -> None:
    from torch.profiler import ProfilerActivity, profile
    body(feats, True)
    sync(feats.device)
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            body(feats, True)
        sync(feats.device)
    per_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    rows = []
    for evt in prof.key_averages():
        dev_us = getattr(evt, "self_device_time_total", 0) if cuda else evt.self_cpu_time_total
        if dev_us <= 0:
            continue
        k = kind(evt.key)
        per_kind[k][0] += dev_us / reps
        per_kind[k][1] += evt.count / reps
        rows.append((dev_us / reps, evt.count / reps, k, evt.key))
    total = sum(v[0] for v in per_kind.values())
    print(f"  GPU kernel time per step: {total / 1000:.2f} ms, kernels per step {sum(v[1] for v in per_kind.values()):.0f}")
    for k, (us, cnt) in sorted(per_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"    {k:20s} {us / 1000:7.3f} ms  {100 * us / total:5.1f} %  {cnt:5.0f} kernels")
    rows.sort(reverse=True)
    for us, cnt, k, name in rows[:30]:
        short = re.sub(r"\s+", " ", name)[:150]
        print(f"    {us:8.1f} us {cnt:5.0f}x  {k:18s} {short}")


def profile_step(trainer: MoLEContinualTrainer, model, cfg: AblationConfig, task: int, feats: FeatureSet) -> None:
    """The steady-state step's kernels: the same body, run eagerly (dry: nothing changes)."""
    params = trainer._trainable(task, slow=False)
    optimizer = trainer._optimizer(params)
    body = trainer._sync_free_body(task, optimizer, params)
    model.train()
    with matmul_tf32(torch.device("cuda"), True):
        profile_body(body, feats.patches[:cfg.batch_size].contiguous())
    model.eval()


def main() -> None:
    dev = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))
    dim = int(os.environ.get("PROBE_DIM", 768))
    grid = int(os.environ.get("PROBE_GRID", 28))
    epochs = int(os.environ.get("PROBE_EPOCHS", 20))
    tasks_per_variant = int(os.environ.get("PROBE_TASKS", 4))
    variants = ["current"] + [v for v in os.environ.get("PROBE_VARIANTS", "unmerged").split(",") if v]
    if os.environ.get("PROBE_ONLY"):
        variants = os.environ["PROBE_ONLY"].split(",")
    torch.backends.cudnn.allow_tf32 = True
    log = logging.getLogger("probe")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    cfg = AblationConfig(num_epochs=epochs)
    gen = torch.Generator().manual_seed(0)
    n = 240

    def features() -> FeatureSet:
        patches = torch.randn(n, grid, grid, dim, generator=gen).to(dev)
        return FeatureSet(patches=patches, router=patches.mean(dim=(1, 2)).cpu(), labels=torch.zeros(n), masks=None)

    original, original_dia, original_conv = original_run_expert, DIASubnet.forward, lora.depthwise_conv2d
    original_mixer = SpatialContextMixer.forward
    original_options = dict(fusion_module.COMPILE_OPTIONS)
    for variant in variants:
        LoRALinear.run_expert = (unmerged_run_expert if "unmerged" in variant else
                                 thin_grad_run_expert if "thinwgrad" in variant else original)
        DIASubnet.forward = paired_dia_forward if "dia" in variant else original_dia
        lora.depthwise_conv2d = aten_depthwise_conv2d if "atenconv" in variant else original_conv
        SpatialContextMixer.forward = flipped_mixer_forward if "mixer" in variant else original_mixer
        fusion_module.COMPILE_OPTIONS = dict(original_options)
        if "layoutopt" in variant:  # Inductor's layout optimisation off (nolayoutopt) or on (layoutopt)
            fusion_module.COMPILE_OPTIONS["options"] = {"layout_optimization": "nolayoutopt" not in variant}
        if "static" in variant:
            fusion_module.COMPILE_OPTIONS["dynamic"] = False
        reset_compiled()
        torch.manual_seed(0)
        model = build_flow(cfg, dim).to(dev)
        for how in ("sorted", "identity"):
            if f"{how}perm" in variant:
                set_permutations(model, how)
        trainer = MoLEContinualTrainer(cfg, model, PrototypeRouter(), dev, log, progress=False, tf32=True)
        print(f"== variant {variant}: {epochs} epochs x {n} images per task, batch {cfg.batch_size}", flush=True)
        with fusion(dev.type == "cuda", log):
            for task in range(tasks_per_variant):
                feats = features()
                sync(dev)
                start = time.perf_counter()
                stats = trainer.train_task(task, feats)
                sync(dev)
                wall = time.perf_counter() - start
                print(f"  task {task}: {wall:6.2f} s for {stats.steps} steps = {1000 * wall / stats.steps:6.2f} ms/step "
                      f"({n * epochs / wall:5.0f} img/s), loss {stats.final_loss:.1f}", flush=True)
                if "evalfirst" in variant and task == 0:  # as a run does: fused scoring before task 1
                    with torch.no_grad():
                        for size in (8, 12):
                            model(feats.patches[:size], 0)
            if dev.type == "cuda":  # the device-side body needs the fused optimizer
                profile_step(trainer, model, cfg, tasks_per_variant - 1, feats)
        try:
            from torch._dynamo.utils import compile_times
            print("  compile_times:", str(compile_times(repr="str"))[:1500])
        except Exception as err:  # diagnostic only
            print("  compile_times unavailable:", err)
    LoRALinear.run_expert, DIASubnet.forward, lora.depthwise_conv2d = original, original_dia, original_conv
    SpatialContextMixer.forward = original_mixer
    fusion_module.COMPILE_OPTIONS = original_options


if __name__ == "__main__":
    sys.exit(main())
