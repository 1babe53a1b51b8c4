"""``python -m moleflow.cache``: the feature cache's size, or clear it.

    python -m moleflow.cache --info [DIR]     location, size and entries per backbone
    python -m moleflow.cache --clear [DIR]    delete every entry (DIR: default location when left out)

The default location is ``$MOLEFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/moleflow/features``, else
``~/.cache/moleflow/features`` (``moleflow.extractors.cache``). Clearing deletes only what the cache
wrote there (its index and the backbone folders with their ``backbone.json``); do it while no run uses
the folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from moleflow.extractors.cache import default_cache_dir
from moleflow.extractors.cache_files import DESCRIPTION, INDEX, backbone_folders, cache_entries, disk_bytes


def info_lines(root: Path) -> list[str]:
    """What ``--info`` prints: the folder, its images and size on disk and, per backbone, the entries
    and bytes per image."""
    entries = cache_entries(root)
    live = sum(entry.size for entry in entries)
    lines = [f"feature cache {root}: {len(entries)} image(s), {disk_bytes(root) / 1e9:.3f} GB on disk "
             f"({live / 1e9:.3f} GB of entries)"]
    for folder in backbone_folders(root):
        mine = [entry.size for entry in entries if entry.folder == folder.name]
        desc = json.loads((folder / DESCRIPTION).read_text())
        per = f", {sum(mine) / len(mine) / 1e6:.2f} MB per image" if mine else ""
        lines.append(f"  {folder.name}: {desc.get('backbone')} (grid {desc.get('grid')}, D {desc.get('feature_dim')}, "
                     f"amp {desc.get('amp')}, {desc.get('device')}): {len(mine)} image(s), {sum(mine) / 1e9:.3f} GB{per}")
    return lines


def clear(root: Path) -> int:
    """Delete the index and every backbone folder of the cache at ``root``; returns the bytes freed."""
    freed = disk_bytes(root)
    for folder in backbone_folders(root):
        shutil.rmtree(folder, ignore_errors=True)
    for path in root.glob(f"{INDEX}*"):
        path.unlink(missing_ok=True)
    return freed


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moleflow.cache", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--info", nargs="?", const="", metavar="DIR", help="print the cache's size and entries")
    what.add_argument("--clear", nargs="?", const="", metavar="DIR", help="delete every entry of the cache")
    args = parser.parse_args(argv)
    given = args.info if args.info is not None else args.clear
    root = Path(given).expanduser() if given else default_cache_dir()
    if given and not root.is_dir():
        print(f"error: {root} is not a folder; name the feature cache folder (or leave DIR out for the default "
              f"{default_cache_dir()})", file=sys.stderr)
        return 2
    if args.info is not None:
        print("\n".join(info_lines(root)))
    else:
        print(f"cleared the feature cache {root}: {clear(root) / 1e9:.3f} GB freed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
