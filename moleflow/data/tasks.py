"""Continual-learning scenarios: ``B-I`` = B classes in the first task, I in each later one."""

from __future__ import annotations

import re
from typing import Sequence

from moleflow.data.base import DataError

_SCENARIO = re.compile(r"^\s*(\d+)\s*[-xX]\s*(\d+)\s*$")


def parse_cl_scenario(scenario: str) -> tuple[int, int]:
    """``'B-I'`` (such as ``'14-1'``; ``'1x1'`` is accepted too) -> ``(B, I)``, both positive, else
    :class:`DataError`."""
    match = _SCENARIO.match(str(scenario))
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise DataError(f"--cl_scenario {scenario!r} is not valid; use B-I with positive integers "
                        "(e.g. 1-1, 14-1, 10-5, 3-3): B classes in the first task, I in each later one")
    return int(match.group(1)), int(match.group(2))


def split_tasks(classes: Sequence[str], scenario: str) -> list[list[str]]:
    """Group ``classes`` (in task order) by the ``'B-I'`` scenario: the first B classes, then I at a
    time (the last task may hold fewer).

    Raises:
        DataError: Bad scenario, no classes, a repeated class, or B larger than the class count.
    """
    base, increment = parse_cl_scenario(scenario)
    classes = list(classes)
    if not classes:
        raise DataError("no classes to split into tasks; pass --task_classes with at least one class")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise DataError(f"--task_classes repeats {', '.join(repeated)}; name each class once")
    if base > len(classes):
        raise DataError(f"--cl_scenario {scenario} puts {base} classes in the first task but only "
                        f"{len(classes)} are given ({', '.join(classes)}); lower B or add classes")
    return [classes[:base]] + [classes[i:i + increment] for i in range(base, len(classes), increment)]
