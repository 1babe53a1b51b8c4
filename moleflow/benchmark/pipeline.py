"""The main pipeline run end to end with every phase timed (the task loop of ``runner.Run``).

Same components and the same order as a run of ``run_moleflow.py``: data check, decode, then per
task: training features, training (router prototype included), routed evaluation of every seen
class (test features extracted once per class), and after the last task the final routed and
oracle evaluations. What the runner does besides (CSV files, plots, checkpoints) is not timed here.

Phases are timed with the device synchronised at each boundary; a phase nested in another (test
features extracted inside an evaluation, a router prototype fitted inside training) is charged to
the inner phase only. After every task, end-to-end inference (images on the host -> backbone ->
router -> flow of the routed expert -> maps and image scores) is timed on a fixed image set; that
measurement is kept out of the run's total.

The module only calls functions that older trees of the package also have, so the same file can
time a tree before and after a speed change (keyword arguments that are new are passed only
where the function accepts them).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset

from moleflow.benchmark import limits
from moleflow.config.ablation import AblationConfig
from moleflow.data import AnomalyDataset, load_class_split, split_tasks, validate_samples
from moleflow.evaluation import anomaly_map
from moleflow.evaluation import evaluator
from moleflow.extractors import build_extractor
from moleflow.models.memory import PatchMemory
from moleflow.models.mole_nf import build_flow
from moleflow.models.routing import PrototypeRouter
from moleflow.trainer import features as features_mod
from moleflow.trainer.continual_trainer import MoLEContinualTrainer
from moleflow.utils.seed import seed_everything

SUMMARY_METRICS = ("img_auroc", "pixel_auroc", "img_ap", "pixel_ap", "aupro", "routing_acc")


class PhaseClock:
    """Wall time per named phase; nested phases are charged to the innermost one.

    Args:
        device: synchronised at every phase boundary (CUDA) so GPU work lands in its phase.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - frame[1]
            self._stack.pop()
            self.totals[name] += elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class TimedRouter(PrototypeRouter):
    """PrototypeRouter whose prototype fits and routing calls are charged to the 'routing' phase."""

    def __init__(self, clock: PhaseClock, mahalanobis: bool = True) -> None:
        super().__init__(mahalanobis=mahalanobis)
        self.clock = clock

    def add_task(self, features: Tensor) -> None:
        with self.clock("routing"):
            super().add_task(features)

    def route(self, features: Tensor) -> Tensor:
        with self.clock("routing"):
            return super().route(features)


def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (new in the current tree)."""
    return name in inspect.signature(fn).parameters


def param_counts(model: torch.nn.Module) -> dict[str, Any]:
    shared = sum(p.numel() for p in model.shared_parameters())
    per_task = [sum(p.numel() for p in model.task_parameters(t)) for t in range(model.num_tasks)]
    return {"shared": shared, "per_task": per_task, "total": shared + sum(per_task)}


E2E_STAGES = ("copy", "backbone", "routing", "flow", "maps_scores")


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
def e2e_images_per_s(extractor: torch.nn.Module, router: PrototypeRouter, model: torch.nn.Module, images: Tensor,
                     batch: int, config: AblationConfig, device: torch.device, tf32: bool) -> dict[str, Any]:
    """Images/s of host images -> backbone -> router -> routed flow -> maps + image scores.

    Maps and scores stay where the evaluator leaves them (on the GPU in the current tree). The
    images are timed on a second pass over the same set, after an untimed first pass; the timed
    pass also records the milliseconds per image of each stage (``E2E_STAGES``). On CUDA the next
    batch is copied to the device on a second stream while the current one is computed, as a
    serving loop would; the "copy" stage is then the part of the copy the computation waits for.

    Returns:
        {"images_per_s", "ms_per_image", "stage_ms_per_image": {stage: ms}}.
    """
    score_kwargs = {"tf32": tf32} if accepts(evaluator.score_patches, "tf32") else {}
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
        feats = extractor(x)
        tick()
        routed = PrototypeRouter.route(router, feats.mean(dim=(1, 2)))  # untimed: not a phase of the run
        tick()
        scores = evaluator.score_patches(model, feats, routed, batch, device, **score_kwargs)
        tick()
        anomaly_map.anomaly_maps(scores, out_size=size, sigma=config.anomaly_map_sigma)
        anomaly_map.image_scores(scores, method=config.score_aggregation_mode, k=config.score_aggregation_top_k,
                                 percentile=config.score_aggregation_percentile).cpu()
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
    limits.sync(device)    # selection, allocator), so the timing is steady state, not first-shape costs
    start = time.perf_counter()
    passes = one_pass(timed=True)
    limits.sync(device)
    seconds = time.perf_counter() - start
    for marks in passes:
        for name, ms in zip(E2E_STAGES, marks.stage_ms()):
            stages[name] += ms
    return {"images_per_s": len(images) / seconds, "ms_per_image": 1000.0 * seconds / len(images),
            "stage_ms_per_image": {k: v / len(images) for k, v in stages.items()}}


def _decode(datasets: list[AnomalyDataset]) -> int:
    decode_all = getattr(features_mod, "decode_all", None)
    if decode_all is not None:  # current tree: thread pool
        return decode_all(ConcatDataset(datasets))
    count = 0
    for ds in datasets:  # older tree: decoded on the calling thread, as its extract_features did
        for i in range(len(ds)):
            ds[i]
            count += 1
    return count


def _rate(stats: list[dict]) -> Optional[float]:
    """Training images/s over ``stats`` (per-task rows), None when empty. From the third task on,
    nothing is compiled under --compile_flow (task 0 trains unfused, task 1 compiles the graph that
    later tasks share): the steady rate, beside the whole phase's rate that the goal uses."""
    seconds = sum(s["seconds"] for s in stats)
    return sum(s["image_steps"] for s in stats) / seconds if stats and seconds > 0 else None


def _mean_rows(rows: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in SUMMARY_METRICS}


def run_pipeline(config: AblationConfig, device: torch.device, weights: str, amp: bool, tf32: bool,
                 e2e_images: int = 640, e2e_batch: int = 64, progress: bool = False,
                 echo: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run the main pipeline on ``config`` with every phase timed.

    Args:
        config: resolved settings (data, backbone, flow, training, scoring).
        device: where the backbone and the flow run.
        weights: ``"pretrained"`` or ``"random"`` backbone weights (random: speed only).
        amp: bf16 autocast + channels-last backbone on CUDA.
        tf32: TF32 matrix products in the flow on CUDA (where the tree supports it).
        e2e_images: images in the end-to-end inference set.
        e2e_batch: batch of the end-to-end inference measurement.
        progress: tqdm bars.
        echo: called with one line per finished task.

    Returns:
        JSON-ready dict: phases, throughputs, memory, parameters, inference vs tasks, metrics.
    """
    echo = echo or (lambda line: None)
    if device.type == "cuda":  # peaks of this run only (the limits measured before are released)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    clock = PhaseClock(device)
    wall_start = time.perf_counter()
    log = logging.getLogger("moleflow.benchmark.run")
    log.propagate = False
    with clock("setup"):
        seed_everything(config.seed)
        extractor = build_extractor(config.backbone_name, feature_dim=config.feature_dim, img_size=config.img_size,
                                    weights=weights, weights_path=config.backbone_weights,
                                    amp=amp and device.type == "cuda", strides=config.feature_strides,
                                    pooling=config.feature_pooling).to(device)
        model = build_flow(config, extractor.feature_dim).to(device)
        router = TimedRouter(clock, mahalanobis=config.use_mahalanobis)
        trainer_kwargs = {"tf32": tf32} if accepts(MoLEContinualTrainer.__init__, "tf32") else {}
        trainer = MoLEContinualTrainer(config, model, router, device, log, progress, **trainer_kwargs)
        tasks = split_tasks(config.task_classes, config.cl_scenario)
    with clock("data_check"):
        splits = {c: load_class_split(config.dataset, Path(config.data_path), c) for c in config.task_classes}
        for split in splits.values():
            validate_samples([*split.train, *split.test])
    with clock("data_decode"):
        train_sets = [AnomalyDataset([s for c in task for s in splits[c].train], config.img_size) for task in tasks]
        test_sets = {c: AnomalyDataset(splits[c].test, config.img_size) for c in config.task_classes}
        decoded = _decode([*train_sets, *test_sets.values()])
    e2e_set = _e2e_set(test_sets, e2e_images, pin=device.type == "cuda")
    eval_kwargs = {"tf32": tf32} if accepts(evaluator.evaluate_class, "tf32") else {}
    test_cache: dict[str, Any] = {}

    def test_features(name: str) -> Any:
        if name not in test_cache:
            with clock("feature_extraction"):
                test_cache[name] = features_mod.extract_features(
                    extractor, test_sets[name], config.batch_size, device, device, keep_masks=True,
                    desc=f"{name} test", num_workers=config.num_workers, progress=progress)
        return test_cache[name]

    memory = PatchMemory() if config.anomaly_score != "flow" else None

    def evaluate(after: int, oracle: bool) -> list[dict]:
        with clock("evaluation"):
            return [evaluator.evaluate_class(model, router, test_features(c), c, t, config, device, oracle=oracle,
                                             memory=memory, **eval_kwargs).row
                    for t in range(after + 1) for c in tasks[t]]

    image_steps, after_task, inference, growth, train_stats = 0, [], [], [], []
    for task_id in range(len(tasks)):
        with clock("feature_extraction"):
            train = features_mod.extract_features(extractor, train_sets[task_id], config.batch_size, device, device,
                                                  keep_masks=False, desc=f"task {task_id} train",
                                                  num_workers=config.num_workers, progress=progress)
        before = clock.totals["flow_training"]
        with clock("flow_training"):
            stats = trainer.train_task(task_id, train)
        image_steps += len(train) * config.num_epochs
        train_stats.append({"task": task_id, "images": len(train), "steps": stats.steps,
                            "skipped": stats.skipped_batches, "final_loss": stats.final_loss,
                            "seconds": clock.totals["flow_training"] - before,
                            "image_steps": len(train) * config.num_epochs})
        if memory is not None:
            with clock("memory"):
                memory.add_task(evaluator.task_memory(model, train, task_id, config, device))
        del train
        rows = evaluate(task_id, oracle=False)
        after_task.append({"task": task_id, **_mean_rows(rows)})
        growth.append(param_counts(model))
        with clock("e2e_measurement"):
            e2e = e2e_images_per_s(extractor, router, model, e2e_set, e2e_batch, config, device, tf32)
        inference.append({"tasks": task_id + 1, **e2e})
        ips = e2e["images_per_s"]
        echo(f"task {task_id + 1}/{len(tasks)}: train {stats.steps} steps, loss {stats.final_loss:.3f}, "
             f"mean img AUROC {after_task[-1]['img_auroc']:.4f}, e2e {ips:.0f} img/s, "
             f"elapsed {time.perf_counter() - wall_start:.0f}s")
    final = evaluate(len(tasks) - 1, oracle=False)
    oracle = evaluate(len(tasks) - 1, oracle=True) if config.eval_oracle else []
    wall = time.perf_counter() - wall_start
    phases = dict(clock.totals)
    run_total = wall - phases.get("e2e_measurement", 0.0)
    phases["other"] = run_total - sum(v for k, v in phases.items() if k != "e2e_measurement")
    n_train = sum(len(d) for d in train_sets)
    n_test = sum(len(d) for d in test_sets.values())
    return {
        "tasks": tasks,
        "images": {"train": n_train, "test": n_test, "decoded": decoded, "e2e_set": len(e2e_set)},
        "phases_s": phases,
        "run_total_s": run_total,
        "wall_with_measurements_s": wall,
        "training": {"image_steps": image_steps, "seconds": phases["flow_training"],
                     "images_per_s": image_steps / phases["flow_training"], "per_task": train_stats,
                     "from_third_task_images_per_s": _rate(train_stats[2:])},
        "decode_images_per_s": decoded / phases["data_decode"],
        "extraction_images_per_s": (n_train + n_test) / phases["feature_extraction"],
        "inference_e2e": {"batch": e2e_batch, "images_per_s": inference[-1]["images_per_s"],
                          "per_task_count": inference,
                          "last_over_first_ms_per_image": inference[-1]["ms_per_image"] / inference[0]["ms_per_image"]},
        "parameters": {"shared": growth[-1]["shared"], "per_task": growth[-1]["per_task"],
                       "total_after_each_task": [g["total"] for g in growth]},
        "memory": _memory(device),
        "compile_ahead": getattr(trainer, "compile_ahead", None),
        "compile_cache": _compile_cache_counts(),
        "metrics": {"final_routed_mean": _mean_rows(final), "final_oracle_mean": _mean_rows(oracle) if oracle else None,
                    "final_routed_per_class": final, "after_each_task_mean": after_task},
    }


def _e2e_set(test_sets: dict[str, AnomalyDataset], count: int, pin: bool) -> Tensor:
    """Up to ``count`` decoded test images, taken round-robin over the classes, stacked on the host."""
    names = list(test_sets)
    picks: list[Tensor] = []
    index = 0
    while len(picks) < count and any(index < len(test_sets[n]) for n in names):
        for name in names:
            if index < len(test_sets[name]) and len(picks) < count:
                picks.append(test_sets[name][index]["image"])
        index += 1
    images = torch.stack(picks)
    return images.pin_memory() if pin else images


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
