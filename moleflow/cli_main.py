"""Entry point behind run_moleflow.py: user mistakes become one-line errors with a non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from moleflow.config.ablation import ConfigError
from moleflow.config.cli import parse_config
from moleflow.config.resume import resolve_resume

def _user_errors() -> tuple[type[BaseException], ...]:
    from moleflow.data import DataError
    from moleflow.extractors import BackboneError
    from moleflow.trainer.checkpoint import CheckpointError
    from moleflow.trainer.continual_trainer import TrainingError
    from moleflow.utils.experiment import ExperimentError
    return (ConfigError, DataError, BackboneError, CheckpointError, TrainingError, ExperimentError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return the process exit code."""
    errors = _user_errors()
    try:
        config, explicit = parse_config(argv)
        config, resume = resolve_resume(config, explicit)
        from moleflow.runner import run
        result = run(config, resume=resume)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished tasks are saved in the experiment folder (see the last log line); "
              "continue with --resume <folder>", file=sys.stderr)
        return 130
    except OSError as err:
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or err}{where}; check free disk space and permissions", file=sys.stderr)
        return 1
    mean = result.mean_row
    print(f"\nmean image AUROC {100 * mean['img_auroc']:.2f} | pixel AUROC {100 * mean['pixel_auroc']:.2f} | "
          f"image AP {100 * mean['img_ap']:.2f} | pixel AP {100 * mean['pixel_ap']:.2f} | "
          f"AUPRO {100 * mean['aupro']:.2f} | routing accuracy {100 * mean['routing_acc']:.2f}")
    print(f"results: {Path(result.exp_dir)}")
    return 0
