"""The real ``Run`` timed phase by phase, with end-to-end inference measured after every task.

``PhaseClock``, the ``RunClock`` (``moleflow.runner``) given to the ``Run``, synchronises the device at
every phase boundary and charges a phase nested in another (routing inside an evaluation) to the inner
phase only. The end-to-end measurement after each task is kept out of the run's total.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections import defaultdict
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from moleflow.benchmark.limits import sync
from moleflow.benchmark.predict_speed import predict_throughput
from moleflow.build import build_dataset, resolve_device
from moleflow.config.ablation import AblationConfig
from moleflow.evaluation import anomaly_map
from moleflow.evaluation.evaluator import score_patches
from moleflow.models.routing import PrototypeRouter
from moleflow.runner import Run, RunClock
from moleflow.trainer.continual_trainer import TaskStats

SUMMARY_METRICS = ("img_auroc", "pixel_auroc", "img_ap", "pixel_ap", "aupro", "routing_acc")
E2E_STAGES = ("copy", "backbone", "routing", "flow", "maps_scores")


class PhaseClock(RunClock):
    """Wall time per named phase; nested phases are charged to the innermost one.

    Args:
        device: synchronised at every phase boundary (CUDA) so GPU work lands in its phase.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self.last: dict[str, float] = {}  # each phase's own time in its latest occurrence
        self._stack: list[list[Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        sync(self.device)
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            sync(self.device)
            elapsed = time.perf_counter() - frame[1]
            self._stack.pop()
            self.totals[name] += elapsed - frame[2]
            self.last[name] = elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed


class BenchmarkClock(PhaseClock):
    """The phases, and after each task: its training time, the means, parameter growth and
    end-to-end inference on ``e2e_images`` test images (decoded once, in the measurement's phase)."""

    def __init__(self, device: torch.device, e2e_images: int, e2e_batch: int,
                 echo: Optional[Callable[[str], None]] = None) -> None:
        super().__init__(device)
        self.e2e_images, self.e2e_batch, self.echo = e2e_images, e2e_batch, echo or (lambda line: None)
        self.started = time.perf_counter()
        self.train_stats: list[dict] = []
        self.after_task: list[dict] = []
        self.growth: list[dict] = []
        self.inference: list[dict] = []
        self.e2e_set: Optional[Tensor] = None

    def task_done(self, run: Run, task_id: int, stats: Optional[TaskStats], mean: dict) -> None:
        images = sum(len(run.splits[c].train) for c in run.tasks[task_id])
        self.train_stats.append({"task": task_id, "images": images, "steps": stats.steps if stats else 0,
                                 "skipped": stats.skipped_batches if stats else 0,
                                 "final_loss": stats.final_loss if stats else None,
                                 "seconds": self.last.get("flow_training", 0.0) if stats else 0.0,
                                 "image_steps": (images * run.config.num_epochs) if stats else 0})
        self.after_task.append({"task": task_id, **{k: mean[k] for k in SUMMARY_METRICS}})
        self.growth.append(param_counts(run.model))
        with self.phase("e2e_measurement"):
            if self.e2e_set is None:
                self.e2e_set = _e2e_set(run, self.e2e_images)
            e2e = e2e_images_per_s(run, self.e2e_set, self.e2e_batch)
        self.inference.append({"tasks": task_id + 1, **e2e})
        self.echo(f"task {task_id + 1}/{len(run.tasks)}: train {self.train_stats[-1]['steps']} steps, loss "
                  f"{stats.final_loss if stats else float('nan'):.3f}, mean img AUROC {mean['img_auroc']:.4f}, "
                  f"e2e {e2e['images_per_s']:.0f} img/s, elapsed {time.perf_counter() - self.started:.0f}s")


def param_counts(model: torch.nn.Module) -> dict[str, Any]:
    shared = sum(p.numel() for p in model.shared_parameters())
    per_task = [sum(p.numel() for p in model.task_parameters(t)) for t in range(model.num_tasks)]
    return {"shared": shared, "per_task": per_task, "total": shared + sum(per_task)}


class _StageMarks:
    """Time between consecutive marks of one pass, per stage (CUDA events: no extra syncs)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def stage_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (call after a synchronize)."""
        pairs = zip(self.marks, self.marks[1:])
        if self.cuda:
            return [a.elapsed_time(b) for a, b in pairs]
        return [1000.0 * (b - a) for a, b in pairs]


@torch.no_grad()
def e2e_images_per_s(run: Run, images: Tensor, batch: int) -> dict[str, Any]:
    """Images/s of host images -> backbone -> router -> routed flow -> maps + image scores (left on
    the device), timed on a second pass after an untimed first one, with ms/image per stage.

    On CUDA the next batch is copied on a second stream while the current one is computed, as a
    serving loop would; the "copy" stage is then the part of the copy the computation waits for.

    Returns:
        {"images_per_s", "ms_per_image", "stage_ms_per_image": {stage: ms}}.
    """
    device, cfg = run.device, run.config
    size = tuple(images.shape[-2:])
    stages = {name: 0.0 for name in E2E_STAGES}
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def fetch(start: int) -> tuple[Tensor, Any]:
        """Start copying the batch at ``start``; returns (device tensor, event that marks the copy done)."""
        if copy_stream is None:
            return images[start:start + batch].to(device), None
        with torch.cuda.stream(copy_stream):
            x = images[start:start + batch].to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy_stream)
        return x, done

    def one(start: int, pending: tuple[Tensor, Any], marks: Optional[_StageMarks]) -> tuple[Tensor, Any]:
        """Process the fetched batch at ``start``; returns the next batch's fetch (started here)."""
        tick = marks.mark if marks is not None else (lambda: None)
        tick()
        x, done = pending
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)
            x.record_stream(torch.cuda.current_stream(device))  # allocated on the copy stream
        nxt = fetch(start + batch) if start + batch < len(images) else (None, None)
        tick()
        feats = run.extractor(x)
        tick()
        routed = PrototypeRouter.route(run.router, feats.mean(dim=(1, 2)))
        tick()
        scores = score_patches(run.model, feats, routed, batch, device, tf32=cfg.tf32)
        tick()
        anomaly_map.anomaly_maps(scores, out_size=size, sigma=cfg.anomaly_map_sigma)
        anomaly_map.image_scores(scores, method=cfg.score_aggregation_mode, k=cfg.score_aggregation_top_k,
                                 percentile=cfg.score_aggregation_percentile).cpu()
        tick()
        return nxt

    def one_pass(timed: bool) -> list[_StageMarks]:
        passes: list[_StageMarks] = []
        pending = fetch(0)
        for s in range(0, len(images), batch):
            if timed:
                passes.append(_StageMarks(device))
            pending = one(s, pending, passes[-1] if timed else None)
        return passes

    one_pass(timed=False)  # warm-up: every sub-batch shape of the timed pass is seen once (kernel
    sync(device)           # selection, allocator), so the timing is steady state, not first-shape costs
    start = time.perf_counter()
    passes = one_pass(timed=True)
    sync(device)
    seconds = time.perf_counter() - start
    for marks in passes:
        for name, ms in zip(E2E_STAGES, marks.stage_ms()):
            stages[name] += ms
    return {"images_per_s": len(images) / seconds, "ms_per_image": 1000.0 * seconds / len(images),
            "stage_ms_per_image": {k: v / len(images) for k, v in stages.items()}}


def _round_robin(seqs: list, count: int) -> list:
    """Up to ``count`` items: item 0 of each of ``seqs``, then item 1 of each, ... (each read once)."""
    picks: list = []
    index = 0
    while len(picks) < count and any(index < len(s) for s in seqs):
        for seq in seqs:
            if index < len(seq) and len(picks) < count:
                picks.append(seq[index])
        index += 1
    return picks


def _e2e_set(run: Run, count: int) -> Tensor:
    """Up to ``count`` test images, round-robin over the classes, stacked on the host (pinned on CUDA)."""
    sets = [build_dataset(run.config, run.splits[c].test) for c in run.config.task_classes]
    images = torch.stack([item["image"] for item in _round_robin(sets, count)])
    return images.pin_memory() if run.device.type == "cuda" else images


def _e2e_paths(run: Run, count: int) -> list[str]:
    """The files of ``_e2e_set``'s images, in its order."""
    tests = [run.splits[c].test for c in run.config.task_classes]
    return [str(sample.image_path) for sample in _round_robin(tests, count)]


def _mean(rows: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in SUMMARY_METRICS}


def timed_run(config: AblationConfig, weights: str, e2e_images: int = 640, e2e_batch: int = 64,
              progress: bool = False, echo: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run the experiment of ``config`` (``moleflow.runner.Run``) with every phase timed.

    Args:
        config: resolved settings (data, backbone, flow, training, scoring, where the folder goes).
        weights: ``"pretrained"`` or ``"random"`` backbone weights (random: speed only).
        e2e_images: images in the end-to-end inference set.
        e2e_batch: batch of the end-to-end inference measurement.
        progress: the run's log lines (and, on a terminal, progress bars) on stdout.
        echo: called with one line per finished task.

    Returns:
        JSON-ready dict: phases, throughputs, memory, parameters, inference vs tasks, metrics.
    """
    device = resolve_device(config.device)
    if device.type == "cuda":  # peaks of this run only (the limits measured before are released)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    clock = BenchmarkClock(device, e2e_images, e2e_batch, echo)
    run = Run(config, progress=progress, clock=clock, weights=weights)
    result = run.execute()
    wall = time.perf_counter() - clock.started
    predict = predict_throughput(run, clock.e2e_set, _e2e_paths(run, len(clock.e2e_set)), e2e_batch)
    phases = dict(clock.totals)
    run_total = wall - phases.get("e2e_measurement", 0.0)
    phases["other"] = run_total - sum(v for k, v in phases.items() if k != "e2e_measurement")
    n_train = sum(len(run.splits[c].train) for c in config.task_classes)
    n_test = sum(len(run.splits[c].test) for c in config.task_classes)
    n_held = sum(len(v) for v in run.held_out.values())
    decoded = n_train + n_held + n_test
    decode_extraction = phases.get("data_decode", 0.0) + phases.get("feature_extraction", 0.0)
    stats, growth, inference = clock.train_stats, clock.growth, clock.inference
    image_steps = sum(s["image_steps"] for s in stats)
    train_s = phases.get("flow_training", 0.0)
    steady = stats[2:]  # from the third task on nothing compiles under --compile_flow (task 1 compiles the graph)
    steady_rate = _per_s(sum(s["image_steps"] for s in steady), sum(s["seconds"] for s in steady))
    oracle = result.oracle_mean_row
    return {
        "tasks": run.tasks,
        "experiment": str(result.exp_dir),
        "images": {"train": n_train, "held_out": n_held, "test": n_test, "decoded": decoded,
                   "e2e_set": len(clock.e2e_set)},
        "phases_s": phases,
        "run_total_s": run_total,
        "wall_with_measurements_s": wall,
        "training": {"image_steps": image_steps, "seconds": train_s, "images_per_s": _per_s(image_steps, train_s),
                     "per_task": stats, "from_third_task_images_per_s": steady_rate},
        "decode_images_per_s": _per_s(decoded, phases.get("data_decode", 0.0)),
        "extraction_images_per_s": _per_s(decoded, phases.get("feature_extraction", 0.0)),
        # decoding overlaps extraction (data_decode: cache reads, augmenting sets): the sum is the figure to read
        "decode_extraction_s": decode_extraction,
        "decode_extraction_images_per_s": _per_s(decoded, decode_extraction),
        "feature_cache": {"folder": str(run.source.cache.root) if run.source.cache else None,
                          "images_from_cache": run.source.total.cached, "images_extracted": run.source.total.extracted},
        "inference_e2e": {"batch": e2e_batch, "images_per_s": inference[-1]["images_per_s"],
                          "per_task_count": inference,
                          "last_over_first_ms_per_image": inference[-1]["ms_per_image"] / inference[0]["ms_per_image"]},
        "predict": predict,
        "parameters": {"shared": growth[-1]["shared"], "per_task": growth[-1]["per_task"],
                       "total_after_each_task": [g["total"] for g in growth]},
        "memory": _memory(device),
        "compile_ahead": run.ahead.report,
        "compile_cache": _compile_cache_counts(),
        "metrics": {"final_routed_mean": _mean(result.final_rows),
                    "final_oracle_mean": {k: oracle[k] for k in SUMMARY_METRICS} if oracle else None,
                    "final_routed_per_class": result.final_rows, "after_each_task_mean": clock.after_task},
    }


def _per_s(images: int, seconds: float) -> Optional[float]:
    return images / seconds if seconds > 0 else None


def _compile_cache_counts() -> dict[str, int]:
    """How often torch's on-disk compile caches were hit or missed in this process so far
    (Inductor's FX graphs, AOTAutograd's joint graphs)."""
    from torch._dynamo.utils import counters
    return {**{k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
            **{k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")}}


def _memory(device: torch.device) -> dict[str, float]:
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB (Linux)
    out = {"host_peak_rss_gib": host}
    if device.type == "cuda":
        out["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 1024**3
        out["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 1024**3
    return out
