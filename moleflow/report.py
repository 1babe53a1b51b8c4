"""The files of a finished run: final results (routed and oracle), per-image scores and the AUROC per
defect type, thresholds, the accuracy matrices and forgetting, the routing confusion, diagnostics.

``write_final`` reads a ``moleflow.runner.Run`` (passed in, never imported: the runner is the layer
above): its ``config``, ``tasks``, ``splits``, ``exp_dir``, ``log``, ``matrices``, ``router``,
``calibration``, ``test_cache``, ``model`` and ``device``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from moleflow.build import build_dataset
from moleflow.evaluation.calibration import router_distances
from moleflow.evaluation.continual import write_continual_summary
from moleflow.evaluation.evaluator import ClassEvaluation
from moleflow.evaluation.per_image import (
    DEFECT_COLUMNS, PER_IMAGE_COLUMNS, defect_type_rows, per_image_rows, write_rows,
)
from moleflow.experiment import close_logger, format_table, write_results_csv

THRESHOLD_COLUMNS = ["task_id", "classes", "held_out_images", "threshold_quantile", "threshold", "held_out_score_min",
                     "held_out_score_max", "router_limit", "held_out_distance_max", "train_distance_max"]


@dataclass
class RunResult:
    """What a finished run produced."""

    exp_dir: Path
    final_rows: list[dict]
    mean_row: dict
    oracle_mean_row: Optional[dict]


def write_final(run: Any, routed: list[ClassEvaluation], oracle: Optional[list[ClassEvaluation]],
                history: bool = True) -> RunResult:
    """Write the final files of ``run`` (module docstring); ``history=False`` leaves out the accuracy
    matrices and forgetting (a re-evaluation has only the final scores)."""
    cfg, exp_dir, names = run.config, run.exp_dir, ["+".join(t) for t in run.tasks]
    rows = [r.row for r in routed]
    mean = write_results_csv(exp_dir / "final_results.csv", rows)
    oracle_mean = None
    if oracle is not None:
        oracle_mean = write_results_csv(exp_dir / "final_results_oracle.csv", [r.row for r in oracle])
    image_rows = _per_image(run, routed)
    write_rows(exp_dir / "per_image_scores.csv", PER_IMAGE_COLUMNS, image_rows)
    write_rows(exp_dir / "results_by_defect_type.csv", DEFECT_COLUMNS, defect_type_rows(image_rows))
    write_rows(exp_dir / "thresholds.csv", THRESHOLD_COLUMNS, threshold_rows(run.calibration, names))
    # without the router the true task is used: no routing was measured, so none is reported
    measured = {m: x for m, x in run.matrices.items() if cfg.use_router or m != "routing_acc"} if history else {}
    for metric, matrix in measured.items():
        matrix.to_csv(exp_dir / f"matrix_{metric}.csv")
    if history:
        write_continual_summary(measured, exp_dir / "continual_summary.csv")
    confusion = _confusion(routed, len(run.tasks)) if cfg.use_router else None
    if confusion is not None:
        from moleflow.evaluation.plots import plot_confusion_matrix, save_confusion_csv
        save_confusion_csv(confusion.numpy(), names, exp_dir / "routing_confusion.csv")
        plot_confusion_matrix(confusion.numpy(), names, exp_dir / "routing_confusion.png")
    else:
        run.log.info("routing: n/a (oracle: the true task id was used; no routing matrix or confusion written)")
    if cfg.run_diagnostics:
        from moleflow.evaluation.diagnostics import class_diagnostics, write_diagnostics
        classes = [class_diagnostics(run.model, run.device, run.test_cache[r.row["class_name"]], r,
                                     build_dataset(cfg, run.splits[r.row["class_name"]].test)) for r in routed]
        out = write_diagnostics(exp_dir / "diagnostics", classes, {m: x.values for m, x in measured.items()}, names,
                                confusion)
        run.log.info(f"diagnostics written to {out}")
    label = "routed" if cfg.use_router else "oracle: the true task, no router"
    run.log.info(f"final results ({label}, %):\n" + format_table([*rows, mean]))
    run.log.info(decision_line(mean))
    if oracle_mean is not None:
        run.log.info(f"oracle mean: img AUROC {oracle_mean['img_auroc']:.4f} pixel AUROC "
                     f"{oracle_mean['pixel_auroc']:.4f}")
    run.log.info(f"results written to {exp_dir}")
    close_logger(run.log)
    return RunResult(exp_dir, rows, mean, oracle_mean)


def decision_line(mean: dict) -> str:
    """The mean decision metrics in one line (n/a without thresholds)."""
    def pct(key: str) -> str:
        value = mean.get(key, float("nan"))
        return "n/a" if math.isnan(value) else f"{100 * value:.2f}"

    return (f"decisions at the held-out thresholds (%): F1 {pct('f1_at_threshold')} precision "
            f"{pct('precision_at_threshold')} recall {pct('recall_at_threshold')} | F1-max picked on the test set "
            f"(for comparison with papers only) {pct('f1_max_test_picked')}")


def threshold_rows(calibration: Any, names: list[str]) -> list[dict]:
    """One row per calibrated task of a ``Calibration``."""
    rows = []
    for task_id, cal in enumerate(calibration.tasks):
        scores = cal.held_out_scores
        rows.append({"task_id": task_id, "classes": names[task_id], "held_out_images": len(scores),
                     "threshold_quantile": float(cal.quantile), "threshold": _num(cal.threshold),
                     "held_out_score_min": _num(min(scores) if scores else None),
                     "held_out_score_max": _num(max(scores) if scores else None),
                     "router_limit": _num(cal.router_limit), "held_out_distance_max": _num(cal.held_out_distance_max),
                     "train_distance_max": _num(cal.train_distance_max)})
    return rows


def _num(value: Optional[float]) -> float:
    return float("nan") if value is None else float(value)


def _per_image(run: Any, routed: list[ClassEvaluation]) -> list[dict]:
    rows: list[dict] = []
    thresholds = run.calibration.thresholds()
    for result in routed:
        name = result.row["class_name"]
        distances = None
        if run.config.use_router and run.router.num_tasks:
            every = router_distances(run.router, run.test_cache[name].router, run.device).cpu()
            distances = every.gather(1, result.routed.long()[:, None]).squeeze(1).tolist()
        rows += per_image_rows(result.row["task_id"], name, run.splits[name].test, result.image_scores.tolist(),
                               result.routed.tolist(), distances, thresholds, Path(run.config.data_path))
    return rows


def _confusion(results: list[ClassEvaluation], n: int) -> torch.Tensor:
    conf = torch.zeros(n, n, dtype=torch.long)
    for r in results:
        for routed in r.routed.tolist():
            conf[r.row["task_id"], routed] += 1
    return conf
