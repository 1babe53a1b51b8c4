"""The embedded demo dataset: three synthetic classes in the MVTec AD layout.

``fabric`` (a denim-like twill texture), ``tile`` (ceramic tiles on grout) and ``nut`` (a steel
hex nut on a table) differ clearly from one another, vary naturally within themselves, and carry
visible defects with exact masks (see ``demo_defects``). Generation is deterministic (a numpy
Generator per image, seeded from ``seed``), writes into a temporary folder that is renamed into
place, and is skipped when the marker of the same settings is present.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from moleflow.data.base import DEMO_CLASSES, DataError
from moleflow.data.demo_defects import DEFECTS
from moleflow.data.demo_render import RENDERERS

MARKER = ".moleflow_demo_v1"
STREAM_TRAIN, STREAM_TEST_GOOD, STREAM_TEST_DEFECT = 0, 1, 2  # image seed = [seed, class, stream, ...]


def generate_demo_dataset(root: Path, seed: int = 0, *, size: int = 224, n_train: int = 40,
                          n_test_good: int = 10, n_test_defect: int = 4) -> list[str]:
    """Write the demo dataset under ``root`` (MVTec AD layout), unless it is already there.

    Per class: ``n_train`` good training images, ``n_test_good`` good test images and
    ``n_test_defect`` images of each of its three defect types, ``size`` x ``size`` RGB PNG,
    masks 0/255 PNG in ``ground_truth/<defect>/<stem>_mask.png``. ``seed`` drives all randomness:
    the same arguments always give the same bytes. The parent of ``root`` is created if needed.

    Returns:
        The class names in task order (:data:`DEMO_CLASSES`).

    Raises:
        DataError: ``root`` exists, is not empty and is not a demo dataset written here.
    """
    root = Path(root)
    stamp = (f"seed={seed} size={size} n_train={n_train} n_test_good={n_test_good} "
             f"n_test_defect={n_test_defect}\n")
    marker = root / MARKER
    if marker.is_file() and marker.read_text() == stamp:
        return list(DEMO_CLASSES)
    if root.exists() and not marker.is_file() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not a MoLE-Flow demo dataset; pass another "
                        "--data_path or remove that folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.parent / f".{root.name}.partial-{os.getpid()}"
    try:
        for class_index, class_name in enumerate(DEMO_CLASSES):
            _write_class(partial / class_name, class_name, (seed, class_index), size,
                         n_train, n_test_good, n_test_defect)
        (partial / MARKER).write_text(stamp)
        if marker.is_file() and marker.read_text() == stamp:  # another process finished first
            shutil.rmtree(partial)
        else:
            _replace(partial, root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return list(DEMO_CLASSES)


def _write_class(folder: Path, class_name: str, seed: tuple[int, int], size: int,
                 n_train: int, n_test_good: int, n_test_defect: int) -> None:
    """Write one class: train/good, test/good, test/<defect> and ground_truth/<defect>."""
    render = RENDERERS[class_name]
    for stream, part, count in ((STREAM_TRAIN, "train", n_train), (STREAM_TEST_GOOD, "test", n_test_good)):
        for index in range(count):
            scene = render(np.random.default_rng([*seed, stream, index]), size)
            _save(scene.image, folder / part / "good" / f"{index:03d}.png")
    for defect_index, (defect_name, add_defect) in enumerate(DEFECTS[class_name].items()):
        for index in range(n_test_defect):
            rng = np.random.default_rng([*seed, STREAM_TEST_DEFECT, defect_index, index])
            scene = render(rng, size)
            image, mask = add_defect(scene, rng)
            while not mask.any():  # a defect too small to see at a tiny size: draw another
                image, mask = add_defect(scene, rng)
            _save(image, folder / "test" / defect_name / f"{index:03d}.png")
            _save(mask.astype(np.float64), folder / "ground_truth" / defect_name / f"{index:03d}_mask.png")


def _save(pixels: np.ndarray, path: Path) -> None:
    """Save float pixels in [0, 1] (``(S, S, 3)`` RGB or ``(S, S)`` grey) as an 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)).save(path)


def _replace(partial: Path, root: Path) -> None:
    """Move the finished ``partial`` folder to ``root``, replacing an older demo there."""
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}"
        root.rename(old)
        partial.rename(root)
        shutil.rmtree(old)
    else:
        partial.rename(root)
