"""Where a flow training step spends its GPU time: ``python -m moleflow.benchmark.profile``.

Profiles training steps of the main-configuration flow (task 0: everything trains; task 1:
frozen base) and inference on random patch features; prints the operators with the most device
time (CUDA) or CPU time (elsewhere).
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from moleflow.benchmark.limits import sync, training_step, two_task_flow
from moleflow.config.ablation import AblationConfig
from moleflow.models.loss import patch_nll
from moleflow.utils.precision import matmul_tf32


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moleflow.benchmark.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="training images per step (default 16)")
    parser.add_argument("--dim", type=int, default=768, help="feature width D")
    parser.add_argument("--grid", type=int, default=28, help="patch grid side")
    parser.add_argument("--tf32", action="store_true", help="TF32 matrix products on CUDA")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per task")
    parser.add_argument("--rows", type=int, default=18, help="operators printed per table")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = AblationConfig()
    model = two_task_flow(config, args.dim, device)
    x = torch.randn(args.batch, args.grid, args.grid, args.dim, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with matmul_tf32(device, args.tf32):
        for task in (0, 1):
            step = training_step(model, config, task, x, device)
            for _ in range(2):
                step()
            with profile(activities=activities) as prof:
                for _ in range(args.steps):
                    step()
                sync(device)
            print(f"=== training step, task {task}, batch {args.batch}, {'tf32' if args.tf32 else 'fp32'}, "
                  f"{args.steps} steps")
            print(prof.key_averages().table(sort_by=sort_key, row_limit=args.rows))
        model.eval()
        model.requires_grad_(False)
        with torch.no_grad():
            patch_nll(*model(x, 1))
            with profile(activities=activities) as prof:
                for _ in range(args.steps):
                    patch_nll(*model(x, 1))
                sync(device)
        print(f"=== inference, batch {args.batch}")
        print(prof.key_averages().table(sort_by=sort_key, row_limit=args.rows))


if __name__ == "__main__":
    main()
