"""Where e2e inference time goes at batch 256 on a GPU (diagnostic, prints ms per image).

python benchmarks/e2e_probe.py   (needs CUDA; wide_resnet50_2 with random weights, D 768, 15 tasks)
"""

from __future__ import annotations

import sys
import time

import torch

from moleflow.config.ablation import AblationConfig
from moleflow.evaluation.evaluator import score_patches
from moleflow.extractors import build_extractor
from moleflow.models.mole_nf import build_flow


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main() -> None:
    dev = torch.device("cuda")
    batch = 256
    torch.backends.cuda.matmul.allow_tf32 = False
    ext = build_extractor("wide_resnet50_2", feature_dim=768, img_size=224, weights="random", amp=True).to(dev)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    print(f"extractor (backbone bf16 channels-last + aggregation): {1000 * timed(lambda: ext(x)) / batch:.4f} ms/img",
          flush=True)
    with torch.inference_mode():
        print(f"backbone alone: {1000 * timed(lambda: ext.backbone(x.contiguous(memory_format=torch.channels_last))) / batch:.4f}"
              " ms/img (float32 channels-last, no autocast)", flush=True)
        for n in (64, batch):
            xb = x[:n].contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                t = timed(lambda: ext.backbone(xb))
            print(f"backbone alone, bf16 autocast channels-last, batch {n}: {1000 * t / n:.4f} ms/img", flush=True)
        maps = [m.detach() for m in ext.backbone(x.contiguous(memory_format=torch.channels_last))]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            maps = [m.detach() for m in ext.backbone(x.contiguous(memory_format=torch.channels_last))]
        print(f"map dtypes {[m.dtype for m in maps]}, layouts channels_last "
              f"{[m.is_contiguous(memory_format=torch.channels_last) for m in maps]}", flush=True)
        t = timed(lambda: ext.aggregate(maps, ext._grid, ext.feature_dim))
        print(f"aggregation alone (grouped conv where it applies): {1000 * t / batch:.4f} ms/img", flush=True)
    from torch.profiler import ProfilerActivity, profile
    ext(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ext(x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70), flush=True)
    feats = ext(x)
    del ext, x
    cfg = AblationConfig()
    model = build_flow(cfg, 768).to(dev)
    for _ in range(15):
        model.add_task()
    for layer in model.lora_layers():
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.02)
    model.eval()
    torch.backends.cuda.matmul.allow_tf32 = True
    gen = torch.Generator().manual_seed(0)
    for tasks in (1, 15):
        ids = torch.randint(0, tasks, (batch,), generator=gen)
        t = timed(lambda: score_patches(model, feats, ids, batch, dev, tf32=True))
        print(f"score_patches, {tasks} experts mixed: {1000 * t / batch:.4f} ms/img", flush=True)
    from moleflow.models.fusion import fusion
    with fusion(True):
        for tasks in (1, 15):
            ids = torch.randint(0, tasks, (batch,), generator=gen)
            t = timed(lambda: score_patches(model, feats, ids, batch, dev, tf32=True))
            print(f"score_patches --compile_flow, {tasks} experts mixed: {1000 * t / batch:.4f} ms/img", flush=True)
    torch.cuda.empty_cache()
    ids = torch.randint(0, 15, (batch,), generator=gen)
    t = timed(lambda: score_patches(model, feats, ids, batch, dev, tf32=True))
    print(f"score_patches, 15 experts, after empty_cache: {1000 * t / batch:.4f} ms/img", flush=True)
    print(f"memory allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, reserved "
          f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
