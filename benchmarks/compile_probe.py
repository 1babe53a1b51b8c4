"""How much would fusing the flow's element-wise work save? (diagnostic, needs CUDA; prints ms)

python benchmarks/compile_probe.py   (PROBE_DEVICE=cpu PROBE_BATCH=2 for a dry run)

Times, for the main configuration (D 768, 15 tasks, TF32), the flow's scoring pass at batch 256
(mixed experts, one pass) and a training forward + backward at batch 16 and 64 (task 1), eager and
with ``--compile_flow`` (fused blocks); PROBE_WHOLE=1 also times ``torch.compile`` of the whole
scoring pass (a bound on what fusion can give). Prints compile times and the largest GPU operators.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch

from moleflow.config.ablation import AblationConfig
from moleflow.models.fusion import fusion
from moleflow.models.loss import moleflow_loss, patch_nll
from moleflow.models.mole_nf import build_flow


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], reps: int = 10) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def first_call(fn: Callable[[], object]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def top_ops(fn: Callable[[], object], rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    return prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total", row_limit=rows, max_name_column_width=60)


def main() -> None:
    dev = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg = AblationConfig()
    model = build_flow(cfg, 768).to(dev)
    for _ in range(15):
        model.add_task()
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for layer in model.lora_layers():
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
        for blocks in model.dia:
            for p in blocks.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.eval()

    batch = int(os.environ.get("PROBE_BATCH", 256))
    feats = torch.randn(batch, 28, 28, 768, device=dev)
    ids = torch.randint(0, 15, (batch,), generator=gen).to(dev)

    def score(m: Callable) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                z, log_det = m(feats, ids)
                return patch_nll(z, log_det)
        return run

    eager = score(model)
    t_eager = timed(eager)
    print(f"score, 15 experts mixed, eager: {1000 * t_eager / batch:.4f} ms/img", flush=True)
    print(top_ops(eager), flush=True)
    for name, fused_or_compiled in (("--compile_flow (fused blocks)", None), ("torch.compile of the whole model", model)):
        try:
            with fusion(fused_or_compiled is None):
                fn = score(torch.compile(fused_or_compiled) if fused_or_compiled is not None else model)
                print(f"  compile (first call): {first_call(fn):.1f} s", flush=True)
                t = timed(fn)
                diff = (fn() - eager()).abs().max().item()
            print(f"score, 15 experts mixed, {name}: {1000 * t / batch:.4f} ms/img (max |diff| {diff:.2e})",
                  flush=True)
        except Exception as err:  # a diagnostic: report and go on
            print(f"score compile failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
        if os.environ.get("PROBE_WHOLE", "0") != "1":
            break

    model.train()
    model._pos_cache.clear()  # filled under inference_mode above: such tensors cannot be saved for backward
    task = 1
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.task_parameters(task):
        p.requires_grad_(True)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        z, log_det = model(x, task)
        return moleflow_loss(z, log_det, tail_weight=cfg.tail_weight, tail_ratio=cfg.tail_top_k_ratio,
                             lambda_logdet=cfg.lambda_logdet)

    for train_batch in (16, 64) if dev.type == "cuda" else (2,):
        x = torch.randn(train_batch, 28, 28, 768, device=dev)

        def step(f: Callable) -> Callable[[], None]:
            def run() -> None:
                f(x).backward()
            return run

        t = timed(step(loss_fn))
        print(f"train fwd+bwd, batch {train_batch}, eager: {1000 * t:.2f} ms/step = {train_batch / t:.0f} img/s",
              flush=True)
        if train_batch == 16:
            print(top_ops(step(loss_fn)), flush=True)
        try:
            with fusion(True):
                print(f"  compile (first call): {first_call(step(loss_fn)):.1f} s", flush=True)
                t = timed(step(loss_fn))
                if train_batch == 16:
                    print(top_ops(step(loss_fn)), flush=True)
            print(f"train fwd+bwd, batch {train_batch}, --compile_flow: {1000 * t:.2f} ms/step = "
                  f"{train_batch / t:.0f} img/s", flush=True)
        except Exception as err:
            print(f"train compile failed: {type(err).__name__}: {str(err)[:300]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
