"""``python -m moleflow.reevaluate RUN_DIR [--score_aggregation_mode max ...]``: evaluate a finished run
again with other scoring settings, without training, into a new experiment folder.

The trained flow, memories and router are the run's own; the held-out images are the same (the run's
``--val_fraction`` and ``--seed``), scored again for the thresholds (the router limits stay). The new
folder (default ``<run's log_dir>/<run's name>_reeval_<time>``) gets the files of ``report.write_final``
but not the accuracy matrices (they need every task's state after each later task). Its ``config.json``
names the source run (``reevaluated_from``) and what changed (``changed``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from moleflow.config.ablation import AblationConfig, ConfigError, apply_overrides
from moleflow.config.cli import build_parser

SCORING = ("score_aggregation_mode", "score_aggregation_top_k", "score_aggregation_percentile", "anomaly_map_sigma",
           "anomaly_score", "memory_weight", "threshold_quantile")
RUN = ("data_path", "device", "log_dir", "experiment_name", "run_diagnostics", "eval_oracle", "quiet", "num_workers",
       "use_feature_cache", "feature_cache", "feature_cache_max_gb")
# anomaly_score of the trained run -> the scores it can give (the flow untrained: no flow score; no memory kept: none)
SCORES_FROM = {"fused": ("fused", "flow", "memory"), "flow": ("flow",), "memory": ("memory",)}


def resolve(saved: AblationConfig, explicit: dict[str, Any], run_dir: Path) -> tuple[AblationConfig, dict[str, Any]]:
    """The re-evaluation's settings: the run's, with the scoring and run flags given; and the changes
    ``{setting: {"from": old, "to": new}}``.

    Raises:
        ConfigError: a score the run cannot give, or a flag that would mean nothing.
    """
    score = explicit.get("anomaly_score", saved.anomaly_score)
    if score not in SCORES_FROM[saved.anomaly_score]:
        raise ConfigError(f"--anomaly_score {score}: {run_dir} was trained with --anomaly_score {saved.anomaly_score} "
                          f"and can give {', '.join(SCORES_FROM[saved.anomaly_score])} only")
    if "memory_weight" in explicit and score != "fused":
        raise ConfigError(f"--memory_weight needs --anomaly_score fused (now {score}); drop --memory_weight")
    if "threshold_quantile" in explicit and saved.val_fraction == 0:
        raise ConfigError(f"--threshold_quantile: {run_dir} was trained with --val_fraction 0 (no held-out images, no "
                          "threshold); drop --threshold_quantile")
    defaults = {"experiment_name": f"{saved.experiment_name}_reeval", "log_dir": str(run_dir.parent)}
    config = apply_overrides(saved, {**defaults, **explicit, "resume": str(run_dir), "demo": False}).validate()
    changed = {k: {"from": getattr(saved, k), "to": getattr(config, k)} for k in SCORING
               if getattr(saved, k) != getattr(config, k)}
    return config, changed


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(only=SCORING + RUN, prog="python -m moleflow.reevaluate",
                          description="Evaluate a finished run again with other scoring settings, without "
                                      "training, into a new experiment folder. A flag left out keeps the run's value "
                                      "(the defaults shown are those of a new run).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="experiment folder of a finished run")
    args = vars(parser.parse_args(argv))
    run_dir = Path(args.pop("run_dir"))
    from moleflow.checkpoint import CheckpointError, saved_config
    from moleflow.cli_main import _user_errors, check_data
    from moleflow.resume import ResumeState
    from moleflow.runner import Run
    from moleflow.trained import read_checkpoint
    try:
        ckpt = read_checkpoint(run_dir)
        tasks = [list(t) for t in ckpt["tasks"]]
        if int(ckpt["tasks_done"]) < len(tasks):
            raise CheckpointError(f"{run_dir} stopped after {ckpt['tasks_done']} of {len(tasks)} tasks; finish it "
                                  f"with python run_moleflow.py --resume {run_dir} first")
        config, changed = resolve(saved_config(ckpt), args, run_dir)
        splits = check_data(config)
        notes = {"reevaluated_from": str(run_dir), "changed": changed}
        run = Run(config, resume=ResumeState(ckpt, run_dir, extend=True, tasks=tasks), splits=splits, notes=notes)
        run.log.info(f"re-evaluating {run_dir} with {changed or 'its own settings'}")
        for task_id in range(len(tasks)):
            run.calibrate(task_id)  # thresholds under the new scoring; the router limits stay
        result = run.finish(history=False)
    except _user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    mean = result.mean_row
    routing = "n/a (oracle)" if math.isnan(mean["routing_acc"]) else f"{100 * mean['routing_acc']:.2f}"
    print(f"\nmean image AUROC {100 * mean['img_auroc']:.2f} | pixel AUROC {100 * mean['pixel_auroc']:.2f} | "
          f"pixel AP {100 * mean['pixel_ap']:.2f} | AUPRO {100 * mean['aupro']:.2f} | routing accuracy {routing}")
    print(f"results: {result.exp_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
