"""Which form of the flow's weight-gradient products runs fastest? (diagnostic, needs CUDA; prints us)

python benchmarks/gemm_probe.py

A training step's weight gradients are products G^T X over the 12,544 patches of a batch (K large,
M x N at most 768 x 768). cuBLAS runs them with Ampere-generation split-K kernels (``nt`` layout),
at about half the rate of the forward products (benchmarks/train_probe.py). This times, in TF32,
each coupling and DIA shape in several forms: as autograd computes it, with the result transposed,
from a transposed (feature-major) copy of G or X, as a batched product over chunks of the
patches, through cuBLASLt, and as Inductor's autotuned product (``max-autotune``).
"""

from __future__ import annotations

import os
import time

import torch


def timed(fn, reps: int = 50) -> float:
    """Mean microseconds per call (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / reps


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    n = int(os.environ.get("GEMM_N", 16 * 28 * 28))
    shapes = [(768, 768), (384, 768), (768, 384), (384, 384)]  # (out, in)
    dev = torch.device("cuda")
    print(f"N = {n} patches, TF32; microseconds per product")
    for out_f, in_f in shapes:
        g = torch.randn(n, out_f, device=dev)
        x = torch.randn(n, in_f, device=dev)
        w = torch.randn(out_f, in_f, device=dev)
        g_t = g.t().contiguous()
        x_t = x.t().contiguous()
        ref = g.t() @ x
        forms = {
            "fwd x W^T (tn)": lambda: x @ w.t(),
            "dgrad G W (nn)": lambda: g @ w,
            "wgrad G^T X (autograd)": lambda: g.t() @ x,
            "wgrad (X^T G)^T": lambda: (x.t() @ g).t(),
            "wgrad G^T(contig) X": lambda: g_t @ x,
            "wgrad G^T(contig) X^T(contig)^T": lambda: g_t @ x_t.t(),
            "wgrad X^T(contig) G, transposed": lambda: (x_t @ g).t(),
            "transpose copy of G": lambda: g.t().contiguous(),
        }
        for chunks in (2, 4, 8):
            forms[f"wgrad bmm over {chunks} chunks + sum"] = (
                lambda c=chunks: torch.bmm(g.view(c, n // c, out_f).transpose(1, 2), x.view(c, n // c, in_f)).sum(0))
        print(f"-- out {out_f} x in {in_f}")
        for name, fn in forms.items():
            value = fn()
            if name.startswith("wgrad"):
                err = (value - ref).abs().max().item() / ref.abs().max().item()
            else:
                err = 0.0
            print(f"   {name:40s} {timed(fn):8.1f} us   rel err {err:.1e}", flush=True)
        try:
            torch.backends.cuda.preferred_blas_library("cublaslt")
            print(f"   {'wgrad G^T X via cuBLASLt':40s} {timed(lambda: g.t() @ x):8.1f} us")
            print(f"   {'fwd via cuBLASLt':40s} {timed(lambda: x @ w.t()):8.1f} us")
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")
        if os.environ.get("GEMM_AUTOTUNE", "1") == "1":
            fn = torch.compile(lambda a, b: a.t() @ b, mode="max-autotune-no-cudagraphs", dynamic=False)
            start = time.perf_counter()
            fn(g, x)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            print(f"   {'wgrad Inductor max-autotune':40s} {timed(lambda: fn(g, x)):8.1f} us "
                  f"(compile {compile_s:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
