"""Tux Paint stamps for the demo shards: scan the stamp tree, split it deterministically, stream samples.

The Debian package ``tuxpaint-stamps-default`` installs about 800 PNG stamps under
``/usr/share/tuxpaint/stamps/<category>/.../X.png``; the English caption is the first line of ``X.txt`` (the
other lines are translations such as ``fr.utf8=...``). Stamps are taken in sorted order; a stem is skipped,
and counted by reason, when it has a PNG but no ``.txt`` (``no_txt``; ``mirror_variant`` for the
``X_mirror.png`` images Tux Paint uses as the mirrored view of stamp ``X``), an empty first line
(``empty_caption``), or a ``.txt`` but no PNG (``no_png``, mostly SVG-only stamps).

The test split is the 15% of stamps whose sha256 of the relative PNG path falls below the threshold: it
depends only on the path, so it is stable across machines, runs and additions of other stamps.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlp.data.writer import SourceSample

TUXPAINT_DEFAULT_ROOT = Path("/usr/share/tuxpaint/stamps")
TUXPAINT_TEST_FRACTION = 0.15
MIRROR_SUFFIX = "_mirror"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Stamp:
    """One captioned stamp: its PNG, caption and path relative to the stamps root (e.g. ``animals/birds/x.png``)."""

    png_path: Path
    caption: str
    relative_path: str

    @property
    def category(self) -> str:
        """The folder relative to the stamps root, e.g. ``animals/birds``."""
        return self.relative_path.rpartition("/")[0]


@dataclass
class StampScan:
    """The captioned stamps in sorted order and the count of skipped stems by reason."""

    stamps: list[Stamp] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def read_caption(txt_path: Path) -> str:
    """The first line of a stamp description file, stripped (a UTF-8 BOM is dropped; bad bytes are replaced)."""
    text = txt_path.read_bytes().decode("utf-8-sig", errors="replace")
    return text.split("\n", 1)[0].strip()


def _skip_reason(stem: Path, has_png: bool, has_txt: bool) -> str | None:
    if not has_png:
        return "no_png"
    if not has_txt:
        base = stem.name.removesuffix(MIRROR_SUFFIX)
        is_mirror = stem.name.endswith(MIRROR_SUFFIX) and stem.with_name(base + ".png").is_file()
        return "mirror_variant" if is_mirror else "no_txt"
    return None


def scan_stamps(root: str | Path) -> StampScan:
    """Walk ``root`` in sorted order and pair every ``X.png`` with the first line of ``X.txt``."""
    root = Path(root)
    pngs = {p.with_suffix("") for p in root.rglob("*.png") if p.is_file()}
    txts = {p.with_suffix("") for p in root.rglob("*.txt") if p.is_file()}
    scan = StampScan()
    for stem in sorted(pngs | txts):
        reason = _skip_reason(stem, stem in pngs, stem in txts)
        caption = "" if reason else read_caption(stem.with_suffix(".txt"))
        if reason is None and not caption:
            reason = "empty_caption"
        if reason:
            scan.skipped[reason] += 1
            continue
        png_path = stem.with_suffix(".png")
        scan.stamps.append(Stamp(png_path, caption, png_path.relative_to(root).as_posix()))
    return scan


def stamp_split(relative_path: str, test_fraction: float = TUXPAINT_TEST_FRACTION) -> str:
    """``"test"`` or ``"train"`` from the sha256 of the relative path: deterministic, about ``test_fraction`` test."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "test" if position < test_fraction else "train"


def split_stamps(stamps: list[Stamp], split: str, *, limit: int | None = None) -> list[Stamp]:
    """The stamps of ``split`` in scan order, at most ``limit`` of them."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    chosen = [s for s in stamps if stamp_split(s.relative_path) == split]
    return chosen if limit is None else chosen[:limit]


def tuxpaint_samples(stamps: list[Stamp], path_key: str = "stamp") -> Iterator[SourceSample]:
    """One :class:`SourceSample` per stamp, reading the PNG from disk (the writer resizes and re-encodes it); the
    json holds ``category`` and, under ``path_key``, the relative path."""
    for stamp in stamps:
        yield SourceSample(
            caption=stamp.caption,
            image_path=str(stamp.png_path),
            extra={"category": stamp.category, path_key: stamp.relative_path},
            source=str(stamp.png_path),
        )
