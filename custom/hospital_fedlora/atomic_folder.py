"""Replace a folder so that readers see the old one or the new one, never half of one.

Models, data sets and adapters are built in a sibling staging folder and swapped in with two renames; a
crash leaves either the previous folder or the complete new one (plus a hidden staging folder at worst).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_folder(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is set aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        if old is not None and not target.exists():
            os.rename(old, target)  # put the previous folder back rather than leave none
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
