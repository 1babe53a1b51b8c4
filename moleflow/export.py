"""``python -m moleflow.export RUN_DIR --format torchscript [--out FILE]``: the routed scorer of a
trained run as one TorchScript file that runs with torch alone (no moleflow, timm or FrEIA).

The module takes ``(B, 3, S, S)`` float32 images, resized to S = ``img_size`` (``resize_mode``: shorter
side + centre crop, or squash) and ImageNet-normalised, and returns ``OUTPUTS``: ``(image_scores (B,),
maps (B, S, S), routed_task (B,) int64, router_distance (B,), threshold (B,), router_limit (B,))``;
``threshold`` is NaN for a task without one, ``router_limit`` inf; anomalous = score > threshold,
unknown class = distance > limit. The preprocessing constants, task names and output order are stored
in the file as the extra file ``moleflow.json`` (``torch.jit.load(path, _extra_files={"moleflow.json": ""})``).

It is a trace of the modules predict runs, differing in summation order only (every image goes through
the flow's one-expert-per-image path; the memory distances of a task's images are one product per
task): scores match predict's to 1e-4.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from moleflow.config.cli import OneLineParser
from moleflow.data import IMAGENET_MEAN, IMAGENET_STD
from moleflow.evaluation.anomaly_map import anomaly_maps, image_scores
from moleflow.models.loss import patch_nll
from moleflow.trained import LOAD_ERRORS, TrainedRun, load_trained

FORMATS = ("torchscript",)
OUTPUTS = ["image_scores", "maps", "routed_task", "router_distance", "threshold", "router_limit"]


class RoutedScorer(nn.Module):
    """Images -> the outputs named in ``OUTPUTS`` (module docstring), written for tracing: no host
    values depend on the data."""

    def __init__(self, trained: TrainedRun) -> None:
        super().__init__()
        self.extractor = trained.extractor
        self.flow = trained.model
        self.settings = trained.settings
        self.img_size = trained.config.img_size
        protos = trained.router.prototypes
        self.mahalanobis = trained.router.mahalanobis
        self.register_buffer("means", torch.stack([p.mean for p in protos]))
        self.register_buffer("precisions", torch.stack([p.precision for p in protos]))
        self.register_buffer("thresholds", torch.tensor([math.nan if t is None else t for t in trained.thresholds()]))
        self.register_buffer("limits", torch.tensor([math.inf if t is None else t for t in trained.router_limits()]))
        self.mode = trained.settings.anomaly_score
        self.banks = nn.ParameterList()
        if trained.memory is not None:
            for memory in trained.memory.tasks:
                self.banks.append(nn.Parameter(memory.bank.float(), requires_grad=False))
            self.register_buffer("stats", torch.tensor([[m.flow_mean, m.flow_std, m.memory_mean, m.memory_std]
                                                        for m in trained.memory.tasks], dtype=torch.float32))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        feats = self.extractor._extract(images).float()                       # (B, h, w, D)
        router = feats.mean(dim=(1, 2))
        squared = []
        for t in range(self.means.shape[0]):  # as PrototypeRouter.distances, one prototype at a time
            diff = router - self.means[t]
            squared.append(((diff @ self.precisions[t]) * diff).sum(dim=1) if self.mahalanobis else diff.pow(2).sum(dim=1))
        distances = torch.stack(squared, dim=1)
        tasks = distances.argmin(dim=1)
        own = distances.gather(1, tasks[:, None]).squeeze(1).clamp_min(0.0).sqrt()
        scores = self._patch_scores(feats, tasks)
        s = self.settings
        image = image_scores(scores, method=s.score_aggregation_mode, k=s.score_aggregation_top_k,
                             percentile=s.score_aggregation_percentile)
        maps = anomaly_maps(scores, out_size=(self.img_size, self.img_size), sigma=s.anomaly_map_sigma)
        return image, maps, tasks, own, self.thresholds[tasks], self.limits[tasks]

    def _patch_scores(self, feats: Tensor, tasks: Tensor) -> Tensor:
        flow = None
        if self.mode != "memory":
            z, log_det = self.flow(feats, tasks)
            flow = patch_nll(z, log_det).float()
        if self.mode == "flow":
            return flow
        b, h, w, d = feats.shape
        dist = torch.zeros(b, h * w, dtype=torch.float32, device=feats.device)
        for t, bank in enumerate(self.banks):  # the images routed to task t against its memory
            rows = (tasks == t).nonzero().flatten()
            queries = feats.index_select(0, rows).reshape(-1, d)
            d2 = queries.pow(2).sum(dim=1, keepdim=True) + bank.pow(2).sum(dim=1) - 2.0 * (queries @ bank.T)
            nearest = d2.min(dim=1).values.clamp_min(0.0).sqrt().reshape(-1, h * w)
            dist = dist.index_copy(0, rows, nearest)
        stats = self.stats[tasks][:, :, None, None]
        memory_z = (dist.reshape(b, h, w) - stats[:, 2]) / stats[:, 3]
        if self.mode == "memory":
            return memory_z
        weight = self.settings.memory_weight
        return (1.0 - weight) * (flow - stats[:, 0]) / stats[:, 1] + weight * memory_z


def export_torchscript(trained: TrainedRun, out: Path, batch: int = 2) -> Path:
    """Trace the routed scorer of ``trained`` (on its device) and save it with its metadata."""
    cfg = trained.config
    scorer = RoutedScorer(trained).eval()
    example = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # range checks on the example's task ids
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.10+ calls TorchScript deprecated (README)
        traced = torch.jit.trace(scorer, example.to(trained.device), check_trace=False)
    meta = {"format": "moleflow-torchscript-v1", "run_dir": str(trained.run_dir), "img_size": cfg.img_size,
            "resize_mode": cfg.resize_mode, "interpolation": "bilinear (PIL), shorter side to img_size then centre crop"
            if cfg.resize_mode == "crop" else "bilinear (PIL), whole image to img_size x img_size",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "pixel_scale": "RGB / 255, then (x - mean) / std",
            "outputs": OUTPUTS, "tasks": trained.class_names, "anomaly_score": cfg.anomaly_score,
            "decision": "anomalous = image_score > threshold; unknown class = router_distance > router_limit"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, str(out), _extra_files={"moleflow.json": json.dumps(meta, indent=2)})
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m moleflow.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="experiment folder of a trained run (with checkpoint.pt)")
    parser.add_argument("--format", choices=FORMATS, default="torchscript", help="torchscript (ONNX: see README)")
    parser.add_argument("--out", default=None, metavar="FILE", help="the file to write (default: RUN_DIR/scorer.pt)")
    parser.add_argument("--device", default="cpu", help="device the trace is made on, and the file's tensors "
                        "(default: cpu; map_location on load moves them)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        trained = load_trained(args.run_dir, device=args.device)
    except LOAD_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else trained.run_dir / "scorer.pt"
    try:
        export_torchscript(trained, out)
    except OSError as error:
        print(f"error: cannot write {out}: {error.strerror or error}; pass a writable --out", file=sys.stderr)
        return 2
    print(f"wrote {out} (TorchScript: images (B, 3, {trained.config.img_size}, {trained.config.img_size}) -> "
          f"{', '.join(OUTPUTS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
