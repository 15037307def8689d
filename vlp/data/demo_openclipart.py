"""Open Clip Art for the demo shards: the PNG tree of ``openclipart-png``, captioned from file and folder names.

The Debian package ``openclipart-png`` installs about 8,100 public-domain clip-art PNGs under
``/usr/share/openclipart/png/<category>/.../<name>.png`` (no description files). A name is the image's title,
often followed by a truncated author name and a number (``canguro_architetto_franc_01.png``,
``light_bulb_karl_bartel_01.png``), so the caption is what the name says, not a human description: the words of
the name without trailing numbers, then the innermost folder in brackets (``"light bulb karl bartel (bulb)"``).
Folders of abstract drawings and user-interface icons (:data:`SKIPPED_FOLDERS`: generated stars and jigsaw
pieces, patterns, gradients, icon themes, flowchart shapes; about half the package) are left out and counted
as ``abstract_folder``; so are names without a letter (``no_words``). Images are taken in sorted path order;
:func:`vlp.data.demo_tuxpaint.tuxpaint_samples` streams them (json: ``category`` and ``file``, the relative path).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from vlp.data.demo_tuxpaint import Stamp, StampScan

OPENCLIPART_DEFAULT_ROOT = Path("/usr/share/openclipart/png")
SKIPPED_FOLDERS = (
    "shapes", "special", "computer/icons", "computer/buttons", "computer/diagrams", "computer/folders", "buttons",
    "unsorted/duplicates",
)
_WORD_SPLIT = re.compile(r"[\s_\-.]+")
_TRAILING_NUMBER = re.compile(r"^\d+[a-z]?$|^[a-z]?\d+$")


def name_words(stem: str) -> list[str]:
    """The words of a file name without trailing numbers (``"dog_05_drawn_with_strai_01"`` -> dog 05 drawn ...)."""
    words = [w for w in _WORD_SPLIT.split(stem.lower()) if w]
    while words and _TRAILING_NUMBER.match(words[-1]):
        words.pop()
    return words


def clipart_caption(relative_path: str) -> str:
    """``"<name words> (<innermost folder>)"``, or ``""`` when the name has no word with a letter."""
    folder, _, filename = relative_path.rpartition("/")
    words = name_words(filename.removesuffix(".png"))
    if not any(re.search(r"[a-z]", w) for w in words):
        return ""
    leaf = folder.rpartition("/")[2].replace("_", " ").lower()
    return f"{' '.join(words)} ({leaf})" if leaf else " ".join(words)


def _png_files(root: Path, skipped: Counter) -> list[str]:
    """Relative paths of the PNGs under ``root``, sorted; the skipped folders are counted, never descended into."""
    found = []
    for directory, subdirs, files in os.walk(root):
        relative_dir = Path(directory).relative_to(root).as_posix()
        prefix = "" if relative_dir == "." else relative_dir + "/"
        if relative_dir in SKIPPED_FOLDERS:
            skipped["abstract_folder"] += sum(name.endswith(".png") for _, _, names in os.walk(directory)
                                              for name in names)
            subdirs.clear()
            continue
        found += [prefix + name for name in files if name.endswith(".png")]
    return sorted(found)


def scan_clipart(root: str | Path) -> StampScan:
    """Every ``*.png`` under ``root`` in sorted order, captioned, minus the skipped folders and wordless names (the
    records are Tux Paint's :class:`~vlp.data.demo_tuxpaint.Stamp`: a captioned PNG under a root)."""
    root = Path(root)
    scan = StampScan()
    for relative in _png_files(root, scan.skipped):
        caption = clipart_caption(relative)
        if not caption:
            scan.skipped["no_words"] += 1
            continue
        scan.stamps.append(Stamp(root / relative, caption, relative))
    return scan
