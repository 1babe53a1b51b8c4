"""Entry point behind run_moleflow.py: user mistakes become one-line errors with a non-zero exit.

The arguments and the data are checked before torch, timm, FrEIA or scipy are imported, so
``--help``, a bad setting or a missing data folder answer at once.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from moleflow.config.ablation import AblationConfig, ConfigError
from moleflow.config.cli import parse_config, preset_ignored_flags
from moleflow.data import ClassSplit, DataError, load_checked_splits, split_tasks


def _user_errors() -> tuple[type[BaseException], ...]:
    from moleflow.extractors import BackboneError
    from moleflow.checkpoint import CheckpointError
    from moleflow.trainer.continual_trainer import TrainingError
    from moleflow.experiment import ExperimentError
    from moleflow.distributed import DistributedError
    return (ConfigError, DataError, BackboneError, CheckpointError, TrainingError, ExperimentError, DistributedError)


def check_data(config: AblationConfig) -> dict[str, ClassSplit]:
    """Every class of the run loaded and checked (files, masks, good and defective test images) and
    the task split formed; with ``--demo`` the demo data is generated first."""
    if config.resume is None:
        split_tasks(config.task_classes, config.cl_scenario)
    if config.demo:
        from moleflow.data import generate_demo_dataset
        generate_demo_dataset(Path(config.data_path), seed=0)
    return load_checked_splits(config.dataset, Path(config.data_path), config.task_classes)


def _fail(err: BaseException) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return the process exit code."""
    try:
        config, explicit = parse_config(argv)
        ignored = preset_ignored_flags(explicit)
        splits = check_data(config) if config.resume is None else None
    except (ConfigError, DataError) as err:
        return _fail(err)
    for message in ignored.values():
        print(f"warning: {message}", file=sys.stderr)
    notes: dict[str, Any] = {"ignored_flags": [{"flag": f"--{flag}", "value": explicit[flag], "reason": message}
                                               for flag, message in ignored.items()]}
    errors = _user_errors()
    try:
        from moleflow.resume import resolve_resume
        from moleflow.runner import run
        config, resume = resolve_resume(config, explicit)
        if resume is not None:
            splits = check_data(config)
        result = run(config, resume=resume, splits=splits, notes=notes)
    except errors as err:
        return _fail(err)
    except KeyboardInterrupt:
        print("interrupted: finished tasks are saved in the experiment folder (see the last log line); "
              "continue with --resume <folder>", file=sys.stderr)
        return 130
    except OSError as err:
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or err}{where}; check free disk space and permissions", file=sys.stderr)
        return 1
    from moleflow.distributed import world
    if not world().writer:  # under torchrun process 0 prints the summary
        return 0
    mean = result.mean_row
    routing = "n/a (oracle)" if math.isnan(mean["routing_acc"]) else f"{100 * mean['routing_acc']:.2f}"
    print(f"\nmean image AUROC {100 * mean['img_auroc']:.2f} | pixel AUROC {100 * mean['pixel_auroc']:.2f} | "
          f"image AP {100 * mean['img_ap']:.2f} | pixel AP {100 * mean['pixel_ap']:.2f} | "
          f"AUPRO {100 * mean['aupro']:.2f} | routing accuracy {routing}")
    print(f"results: {Path(result.exp_dir)}")
    return 0
