"""--resume: continue an interrupted experiment, or extend a finished one with new classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from moleflow.checkpoint import CHECKPOINT_NAME, architecture_differences, load_checkpoint, saved_config
from moleflow.config.ablation import AblationConfig, ConfigError, apply_overrides
from moleflow.data import DataError, list_classes, parse_cl_scenario, split_tasks


@dataclass
class ResumeState:
    """A loaded checkpoint plus the folder to continue in."""

    checkpoint: dict[str, Any]
    exp_dir: Path
    extend: bool
    tasks: list[list[str]]


def resolve_resume(config: AblationConfig, explicit: dict[str, Any]) -> tuple[AblationConfig, Optional[ResumeState]]:
    """Turn ``--resume DIR`` into (config, ResumeState); without it return (config, None).

    The saved settings are the base; explicit flags override them, but a flag that changes the
    architecture (backbone, D, rank, blocks, switches, ...) is refused with the difference named.
    An unfinished run continues in its own folder; a finished run given ``--task_classes NEW...``
    is extended in a new folder (default name ``<old name>_ext``) with the new classes as further
    tasks; old and new classes must be under one ``--data_path`` (the old ones are re-evaluated).
    """
    if config.resume is None:
        return config, None
    exp_dir = Path(config.resume)
    if not exp_dir.is_dir():
        raise ConfigError(f"--resume {exp_dir} is not a folder; pass an experiment folder under --log_dir")
    ckpt = load_checkpoint(exp_dir / CHECKPOINT_NAME)
    saved: dict[str, Any] = dict(ckpt["config"])
    base = saved_config(ckpt)
    overrides = {k: v for k, v in explicit.items() if k not in ("task_classes", "demo")}
    resolved = apply_overrides(base, {**overrides, "resume": str(exp_dir), "demo": False})
    diffs = architecture_differences(saved, resolved.to_dict())
    if diffs:
        raise ConfigError(f"cannot resume {exp_dir}: {'; '.join(diffs)}; drop those flags or start a new run")
    saved_tasks: list[list[str]] = [list(t) for t in ckpt["tasks"]]
    done = int(ckpt["tasks_done"])
    old_classes = [c for t in saved_tasks for c in t]
    # finished = every task trained and the final results written (a run can stop in between)
    finished = done >= len(saved_tasks) and (exp_dir / "final_results.csv").is_file()
    if "task_classes" not in explicit:
        if finished:
            raise ConfigError(f"{exp_dir} already finished its {done} task(s); add classes with "
                              f"--resume {exp_dir} --task_classes NEW_CLASS ...")
        return resolved.validate(), ResumeState(ckpt, exp_dir, extend=False, tasks=saved_tasks)
    if not finished:
        raise ConfigError(f"{exp_dir} stopped after {done} of {len(saved_tasks)} tasks (no final_results.csv); "
                          f"finish it with --resume {exp_dir} (no --task_classes) before adding classes")
    new = list(explicit["task_classes"])
    again = [c for c in new if c in old_classes]
    if again:
        raise ConfigError(f"classes {again} were already learned in {exp_dir}; --task_classes must name new classes")
    _check_one_root(resolved, old_classes, new, exp_dir, str(saved.get("data_path")))
    _, per_task = parse_cl_scenario(resolved.cl_scenario)
    tasks = saved_tasks + split_tasks(new, f"{per_task}-{per_task}")
    changes: dict[str, Any] = {"task_classes": old_classes + new}
    if "experiment_name" not in explicit:  # logs/<name>_* must not match the run that was extended
        changes["experiment_name"] = f"{base.experiment_name}_ext"
    resolved = apply_overrides(resolved, changes).validate()
    return resolved, ResumeState(ckpt, exp_dir, extend=True, tasks=tasks)


def _check_one_root(config: AblationConfig, old: list[str], new: list[str], exp_dir: Path, saved_root: str) -> None:
    """An extended run evaluates the old classes again, so old and new classes must be found under
    the one --data_path; otherwise say so (the loader's own message would only say 'not found')."""
    try:
        found = set(list_classes(config.dataset, Path(config.data_path)))
    except DataError:
        found = set()
    missing = [c for c in old + new if c not in found]
    if missing:
        raise ConfigError(f"--resume {exp_dir} --task_classes {' '.join(new)}: classes {missing} are not under "
                          f"--data_path {config.data_path}; an extended run re-evaluates the old classes {old}, so "
                          f"old and new classes must be under one data root (the run used {saved_root}): put the "
                          "new classes there, or pass a --data_path that holds all of them")

