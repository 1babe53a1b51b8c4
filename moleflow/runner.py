"""run(config): data -> features -> continual training -> evaluation -> experiment folder."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
from tqdm import tqdm

from moleflow import distributed, precompile
from moleflow.build import (
    build_backbone, build_dataset, build_feature_source, build_flow, build_router, build_trainer, resolve_device,
    score_settings,
)
from moleflow.checkpoint import CHECKPOINT_NAME, save_checkpoint
from moleflow.config.ablation import AblationConfig, ConfigError
from moleflow.data import AnomalyDataset, ClassSplit, generate_demo_dataset, load_checked_splits, split_tasks
from moleflow.data.holdout import held_out_of, hold_out_splits
from moleflow.evaluation.calibration import Calibration, calibrate_task
from moleflow.evaluation.continual import ContinualMatrix
from moleflow.evaluation.evaluator import ClassEvaluation, evaluate_class, route, task_memory
from moleflow.evaluation.thresholds import THRESHOLD_RULE, per_image_thresholds, threshold_metrics
from moleflow.experiment import (
    FILE_ONLY, close_logger, create_experiment_dir, library_versions, setup_logger, write_config, write_results_csv,
)
from moleflow.extractors.features import FeatureSet
from moleflow.models.fusion import fusion
from moleflow.models.memory import PatchMemory
from moleflow.models.routing import PrototypeRouter
from moleflow.report import RunResult, write_final
from moleflow.resume import ResumeState
from moleflow.trainer.continual_trainer import TaskStats
from moleflow.utils.seed import seed_everything

MATRIX_METRICS = ("img_auroc", "pixel_auroc", "img_ap", "pixel_ap", "aupro", "routing_acc")


class RunClock:
    """A ``Run`` enters ``phase(name)`` around its work (setup, data_check, data_decode, feature_extraction,
    flow_training, routing, memory, calibration, evaluation, output) and calls ``task_done`` after each
    task's evaluation. This one does nothing; the benchmark's times the phases."""

    def phase(self, name: str) -> ContextManager[None]:
        return contextlib.nullcontext()

    def task_done(self, run: "Run", task_id: int, stats: Optional[TaskStats], mean: dict) -> None:
        """After task ``task_id`` was trained (``stats``; None when the flow is not trained) and every
        seen class evaluated (``mean``: the means over those classes)."""


def interactive() -> bool:
    """stdout and stderr are terminals: progress bars; otherwise plain log lines only."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def effective(config: AblationConfig, device: torch.device) -> dict[str, Any]:
    """Settings as they act on ``device`` (the CUDA-only switches are off elsewhere)."""
    cuda = device.type == "cuda"
    return {"device": str(device), "amp": config.amp and cuda, "tf32": config.tf32 and cuda,
            "compile_flow": config.compile_flow and cuda,
            "cuda_graphs": config.cuda_graphs and cuda and not distributed.world().active,  # not under torchrun
            "compile_ahead": config.compile_ahead and config.compile_flow and cuda}


class Run:
    """One experiment: the model, router, cached features and the result bookkeeping.

    The data (``splits`` when the caller checked them already) and the top-k against the backbone's
    patch grid are checked before the first training step. ``progress=False`` or ``--quiet`` keeps the
    console to warnings; bars only on a terminal. ``clock`` is told the phases (``RunClock``; the benchmark
    times them). ``weights='random'``: the benchmark's speed-only runs.
    """

    def __init__(self, config: AblationConfig, resume: Optional[ResumeState] = None, progress: bool = True,
                 splits: Optional[dict[str, ClassSplit]] = None, notes: Optional[dict[str, Any]] = None,
                 clock: Optional[RunClock] = None, weights: str = "pretrained") -> None:
        self.clock = clock or RunClock()
        self.config = config
        with self.clock.phase("setup"):  # under torchrun: join the processes, cuda:LOCAL_RANK (distributed.py)
            self.device = distributed.start(resolve_device(config.device))
            if config.demo:
                generate_demo_dataset(Path(config.data_path), seed=0)
            self.tasks = resume.tasks if resume else split_tasks(config.task_classes, config.cl_scenario)
        self.progress = progress and not config.quiet and interactive() and distributed.world().writer  # tqdm bars
        with self.clock.phase("data_check"):
            checked = splits if splits is not None else load_checked_splits(config.dataset, Path(config.data_path),
                                                                            config.task_classes)
            # --val_fraction: images never trained on (flow, memory, router), kept to set thresholds
            self.splits, self.held_out = hold_out_splits(checked, config.val_fraction, config.seed)
        self.resume = resume
        with self.clock.phase("setup"):
            self._setup(notes, weights, quiet=config.quiet or not progress)

    def _setup(self, notes: Optional[dict[str, Any]], weights: str, quiet: bool) -> None:
        config = self.config
        seed_everything(config.seed)
        self.extractor = build_backbone(config, self.device, weights)
        if config.feature_dim == 0:  # auto: the backbone's width, at most 768; config.json records the value
            self.config = config = dataclasses.replace(config, feature_dim=self.extractor.feature_dim)
        self._check_top_k()
        resume = self.resume
        self.exp_dir = resume.exp_dir if resume and not resume.extend else distributed.on_writer(
            lambda: create_experiment_dir(config.log_dir, config.experiment_name))  # process 0 writes; all know it
        writer = distributed.world().writer  # the other processes log warnings to the console only
        self.log = setup_logger(self.exp_dir, quiet=quiet) if writer else distributed.console_logger()
        rule = THRESHOLD_RULE if config.val_fraction > 0 else "none (--val_fraction 0)"
        held = {c: len(v) for c, v in self.held_out.items()}
        extra: dict[str, Any] = {"tasks": self.tasks, "effective": effective(config, self.device),
                                 "threshold_rule": rule, "held_out_images": held, **distributed.describe(),
                                 **(notes or {})}
        if resume:
            extra["resumed_from"] = str(resume.exp_dir)
        distributed.on_writer(lambda: write_config(self.exp_dir, config, extra))
        for item in extra.get("ignored_flags", []):
            self.log.info(f"warning: {item['reason']}", extra=FILE_ONLY)  # printed by the CLI already
        self._warn_cuda_only()
        if config.cuda_graphs and self.device.type == "cuda" and distributed.world().active:
            self.log.warning("warning: --cuda_graphs is off under torchrun (DDP's gradient exchange is not recorded "
                             "into a graph); steps run unrecorded (config.json: effective.cuda_graphs = false)")
        dims = self.extractor.layer_dims()
        if min(dims) < config.feature_dim:
            self.log.warning(f"warning: --feature_dim {config.feature_dim} exceeds the backbone's per-layer width "
                             f"{dims}; adaptive pooling repeats channels (features span < D dimensions)")
        self.model = build_flow(config, self.extractor.feature_dim).to(self.device)
        self.router = build_router(config)
        self.memory = PatchMemory() if config.anomaly_score != "flow" else None
        self.calibration = Calibration()
        self.trainer = build_trainer(config, self.model, self.device, self.log, self.progress)
        self.score = score_settings(config)
        self.source = build_feature_source(config, self.extractor, self.device, self.log, self.progress,
                                           images=sum(len(s.train) + len(s.test) for s in self.splits.values()))
        self.test_cache: dict[str, FeatureSet] = {}
        self._train_datasets: dict[tuple[int, bool], AnomalyDataset] = {}
        self.ahead = precompile.CompileAhead(config, self.device, self.log)
        names = ["+".join(t) for t in self.tasks]
        sizes = [len(t) for t in self.tasks]  # final means weight each task by its classes: a mean over classes
        self.matrices = {m: ContinualMatrix(len(self.tasks), names, class_counts=sizes) for m in MATRIX_METRICS}
        self.done = 0
        if resume:
            self._restore(resume.checkpoint)

    # ------------------------------------------------------------------ setup helpers
    def _check_top_k(self) -> None:
        cfg = self.config
        h, w = self.extractor.grid_size()
        if cfg.score_aggregation_mode == "top_k" and cfg.score_aggregation_top_k > h * w:
            raise ConfigError(f"--score_aggregation_top_k {cfg.score_aggregation_top_k} exceeds the {h}x{w} = {h * w} "
                              f"patches of {cfg.backbone_name} at --img_size {cfg.img_size}; use a k <= {h * w}")

    def _warn_cuda_only(self) -> None:
        if self.device.type == "cuda":
            return
        what = {"amp": "the backbone runs in float32", "tf32": "matrix products stay full float32",
                "compile_flow": "the flow runs eagerly"}
        for flag, effect in what.items():
            if getattr(self.config, flag):
                self.log.warning(f"warning: --{flag} has no effect on {self.device} (CUDA only); {effect} "
                                 f"(config.json: effective.{flag} = false)")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        for _ in range(int(ckpt["tasks_done"])):
            self.model.add_task()
        self.model.load_state_dict(ckpt["model"])
        self.router = PrototypeRouter.from_state(ckpt["router"])
        if self.memory is not None:
            self.memory = PatchMemory.from_state(ckpt["memory"])
        self.calibration = Calibration.from_state(ckpt.get("calibration"))
        self.done = int(ckpt["tasks_done"])
        for metric, values in ckpt["history"].items():
            for i, row in enumerate(values):
                for j, value in enumerate(row):
                    if j <= i and not math.isnan(value):  # a row saved before its evaluation is all NaN
                        self.matrices[metric].set(i, j, float(value))
        self.log.info(f"resumed from {self.resume.exp_dir / CHECKPOINT_NAME}: {self.done} task(s) already trained")

    # ------------------------------------------------------------------ data
    @distributed.shard_images  # under torchrun each process extracts its block of images; all get all
    def _features(self, dataset: AnomalyDataset, keep_masks: bool, desc: str) -> FeatureSet:
        """The backbone's features of ``dataset``: read from the feature cache, or decoded and extracted."""
        feats, count = self.source.features(dataset, keep_masks, desc, self.clock.phase)
        self.log.info(f"{desc}: {count.cached} image(s) from the feature cache, {count.extracted} extracted",
                      extra=FILE_ONLY)
        return feats

    def _train_features(self, task_id: int, augment: bool = False) -> FeatureSet:
        key = (task_id, augment)
        if key not in self._train_datasets:  # decoded images stay cached across epochs of this task
            self._train_datasets = {k: v for k, v in self._train_datasets.items() if k[0] == task_id}
            samples = [s for c in self.tasks[task_id] for s in self.splits[c].train]
            self._train_datasets[key] = build_dataset(self.config, samples, augment=augment)
        return self._features(self._train_datasets[key], keep_masks=False, desc=f"task {task_id} features")

    def _test_features(self, class_name: str) -> FeatureSet:
        if class_name not in self.test_cache:
            self.test_cache[class_name] = self._features(build_dataset(self.config, self.splits[class_name].test),
                                                         keep_masks=True, desc=f"{class_name} test features")
        return self.test_cache[class_name]

    # ------------------------------------------------------------------ evaluation
    def evaluate_seen(self, after_task: int, oracle: bool, keep_maps: bool = False) -> list[ClassEvaluation]:
        """Every class of the tasks up to ``after_task``: routed, or with the true task (``oracle``, no router)."""
        pairs = [(task_id, name) for task_id in range(after_task + 1) for name in self.tasks[task_id]]
        label = "oracle" if oracle else "routed"
        results = []
        with self.clock.phase("evaluation"):
            for task_id, name in tqdm(pairs, desc=f"evaluate ({label})", leave=False, disable=not self.progress):
                test = self._test_features(name)
                with self.clock.phase("routing"):
                    routed = None if oracle or not self.config.use_router else route(self.router, test.router,
                                                                                   self.device)
                result = evaluate_class(self.model, test, name, task_id, self.score, self.device, routed=routed,
                                        keep_maps=keep_maps, memory=self.memory)
                thresholds = per_image_thresholds(result.routed.tolist(), self.calibration.thresholds())
                result.row.update(threshold_metrics(test.labels.numpy(), result.image_scores.numpy(), thresholds))
                results.append(result)
        return results

    def _record(self, after_task: int, results: list[ClassEvaluation]) -> None:
        """R[after_task][j] for every seen task j: the mean over task j's classes."""
        for task_id in range(after_task + 1):
            rows = [r.row for r in results if r.row["task_id"] == task_id]
            for metric in MATRIX_METRICS:
                self.matrices[metric].set(after_task, task_id, sum(r[metric] for r in rows) / len(rows))

    def _add_memory(self, task_id: int, train: FeatureSet) -> None:
        """Store task ``task_id``'s patch memory and its training-score statistics (never changed later)."""
        started = time.time()
        with self.clock.phase("memory"):
            memory = task_memory(self.model, train, task_id, self.score, self.device)
            self.memory.add_task(memory)
        self.log.info(f"task {task_id}: patch memory of {memory.bank.shape[0]:,} patches in "
                      f"{time.time() - started:.1f}s (held-out distance {memory.memory_mean:.3f} +- "
                      f"{memory.memory_std:.3f})")

    def calibrate(self, task_id: int, train_router: Optional[torch.Tensor] = None) -> None:
        """Threshold and router limit of the trained task ``task_id`` from its held-out images
        (``evaluation/calibration.py``); ``train_router`` None keeps the router limit it has."""
        held = held_out_of(self.held_out, self.tasks[task_id])
        feats = self._features(build_dataset(self.config, held), keep_masks=False,
                               desc=f"task {task_id} held-out features") if held else None
        previous = self.calibration.tasks[task_id] if task_id < len(self.calibration.tasks) else None
        with self.clock.phase("calibration"):
            cal = calibrate_task(self.model, self.memory, self.router, self.score, self.device, task_id,
                                 self.config.threshold_quantile, feats, train_router, previous)
        self.calibration.set(task_id, cal)
        threshold = "none (--val_fraction 0)" if cal.threshold is None else f"{cal.threshold:.4f}"
        limit = "" if cal.router_limit is None else f"; router limit {cal.router_limit:.3f}"
        self.log.info(f"task {task_id}: threshold {threshold} from {len(held)} held-out image(s){limit}")

    def _checkpoint(self) -> None:
        history = {m: self.matrices[m].values.tolist() for m in MATRIX_METRICS}
        with self.clock.phase("output"):
            distributed.on_writer(lambda: save_checkpoint(self.exp_dir / CHECKPOINT_NAME, {
                "model": self.model.state_dict(), "router": self.router.state(), "config": self.config.to_dict(),
                "memory": self.memory.state() if self.memory is not None else None,
                "calibration": self.calibration.state(),
                "tasks": self.tasks, "tasks_done": self.done, "history": history, "versions": library_versions(),
            }))

    # ------------------------------------------------------------------ the task loop
    def execute(self) -> RunResult:
        try:
            with fusion(self.config.compile_flow and self.device.type == "cuda", self.log):
                return self._execute()
        except KeyboardInterrupt:
            self.source.flush()  # the features extracted so far stay usable by the next run
            self.log.info(f"interrupted after {self.done} finished task(s); continue with "
                          f"python run_moleflow.py --resume {self.exp_dir}")
            close_logger(self.log)
            raise

    def _evaluate_task(self, task_id: int) -> dict:
        """Evaluate the seen classes, record R[task_id][.], write CSV and checkpoint; the means over the classes."""
        results = self.evaluate_seen(task_id, oracle=False)
        self._record(task_id, results)
        with self.clock.phase("output"):
            mean = distributed.on_writer(lambda: write_results_csv(self.exp_dir / f"results_after_task_{task_id}.csv",
                                                                   [r.row for r in results]))
        routing = "n/a (oracle)" if math.isnan(mean["routing_acc"]) else f"{mean['routing_acc']:.4f}"
        self.log.info(f"after task {task_id}: mean img AUROC {mean['img_auroc']:.4f} pixel AUROC "
                      f"{mean['pixel_auroc']:.4f} routing {routing}")
        self._checkpoint()
        return mean

    def _execute(self) -> RunResult:
        self.log.info(f"experiment {self.exp_dir} | device {self.device} | tasks {self.tasks} | "
                      f"optimizer {self.config.optimizer}")
        cfg = self.config
        if self.done and self.matrices["img_auroc"].last_task < self.done - 1:
            self._evaluate_task(self.done - 1)  # stopped between saving the task and its evaluation
        for task_id in range(self.done, len(self.tasks)):
            started = time.time()
            self.log.info(f"=== task {task_id}: {', '.join(self.tasks[task_id])} ===")
            refresh = (lambda t=task_id: self._train_features(t, augment=True)) if cfg.use_augmentation else None
            train = self._train_features(task_id)
            stats = None
            if cfg.anomaly_score == "memory":  # the flow's score is not used: nothing to train
                self.model.add_task()
                self.log.info(f"task {task_id}: --anomaly_score memory, the flow is not trained")
            else:
                self.ahead.before_task(task_id, (cfg.batch_size, *train.patches.shape[1:]))
                with self.clock.phase("flow_training"):
                    stats = self.trainer.train_task(task_id, train, refresh=refresh)
                self.log.info(f"task {task_id} trained in {time.time() - started:.1f}s ({stats.steps} steps, "
                              f"{stats.skipped_batches} skipped, final loss {stats.final_loss:.4f})")
            with self.clock.phase("routing"):  # the task's prototype: all its training images, no augmentation
                self.router.add_task(train.router)
            if self.memory is not None:
                self._add_memory(task_id, train)
            self.calibrate(task_id, train.router)
            self.done = task_id + 1
            self._checkpoint()  # the trained task is safe before its evaluation runs
            mean = self._evaluate_task(task_id)
            self.clock.task_done(self, task_id, stats, mean)
        return self.finish()

    def finish(self, history: bool = True) -> RunResult:
        """The final routed (and oracle) evaluation and the run's files (``report.write_final``; ``history=False``:
        no accuracy matrices, a re-evaluation); new feature-cache entries are all on disk when it returns."""
        last = len(self.tasks) - 1
        routed = self.evaluate_seen(last, oracle=False, keep_maps=self.config.run_diagnostics)
        oracle = self.evaluate_seen(last, oracle=True) if self.config.eval_oracle else None
        with self.clock.phase("output"):
            result = distributed.on_writer(lambda: write_final(self, routed, oracle, history))
            self.source.flush()
        return result


def run(config: AblationConfig, resume: Optional[ResumeState] = None, progress: bool = True,
        splits: Optional[dict[str, ClassSplit]] = None, notes: Optional[dict[str, Any]] = None) -> RunResult:
    """Run (or continue) one experiment end to end.

    Args:
        config: the validated settings.
        resume: a loaded checkpoint to continue or extend.
        progress: print log lines (and, on a terminal, progress bars) to stdout.
        splits: the classes' checked splits (``load_checked_splits``), if the caller has them already.
        notes: extra entries for config.json (e.g. the CLI's ``ignored_flags``).
    """
    return Run(config, resume=resume, progress=progress, splits=splits, notes=notes).execute()
