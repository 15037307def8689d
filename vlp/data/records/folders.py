"""Image files as records: a folder of images with caption sidecars, and ImageFolder trees of class folders.

A folder's images are the files under it whose extension (any case) is one of
:data:`vlp.data.layout.IMAGE_EXTENSIONS`, hidden files and directories (names starting with ``.``) excluded, in
sorted order of their path relative to the folder. Captions come from sidecars (``X.txt`` next to ``X.png``) by
the caption policy of :mod:`vlp.data.records.captions`.

ImageFolder (``root/<class folder>/<image>``): the class index of an image is the position of its folder in
sorted order. For ImageNet-1k the folders are the WordNet ids (``n01440764`` ... ``n15075141``) and sorted order
is the standard class order, the order of open_clip's ``IMAGENET_CLASSNAMES`` (index 0 ``tench`` =
``n01440764``, index 999 ``toilet paper`` = ``n15075141``; the 1000 ids ship with timm as
``imagenet_synsets.txt``, see :func:`imagenet_synsets`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from vlp.data.decode import DecodeLimits, SampleError
from vlp.data.layout import IMAGE_EXTENSIONS
from vlp.data.records.captions import sidecar_captions, sidecar_path
from vlp.data.records.record import Record, SourceError, shown

WNID = re.compile(r"n\d{8}")
UNREADABLE_CAPTION = "unreadable_caption"


def is_image_name(name: str) -> bool:
    """True for a visible file name with an image extension (any case)."""
    return not name.startswith(".") and name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS and "." in name


def list_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (see the module docstring), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        found += [Path(directory) / name for name in files if is_image_name(name)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def file_record(path: Path, *, label: int | None = None, captions: bool = True,
                limits: DecodeLimits | None = None) -> Record:
    """The record of one image file; with ``captions``, those of its sidecar. An unreadable sidecar or one over a
    caption cap gives a record with ``error`` set and no captions."""
    record = Record(key=path.stem, source=str(path), image_path=str(path), image_ext=path.suffix.lower().lstrip("."),
                    label=label)
    if not captions:
        return record
    try:
        return replace(record, captions=tuple(sidecar_captions(path, limits)))
    except SampleError as err:
        return replace(record, error=f"{sidecar_path(path)}: {err}", error_reason=err.reason)
    except OSError as err:
        return replace(record, error=f"unreadable caption file {sidecar_path(path)}: {err}",
                       error_reason=UNREADABLE_CAPTION)


def folder_records(root: str | Path, limits: DecodeLimits | None = None) -> Iterator[Record]:
    """A record for every image under ``root``, captions from its sidecar."""
    return (file_record(path, limits=limits) for path in list_images(root))


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in standard (sorted) class order, as shipped with timm."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def _check_classes(root: Path, classes: list[str], expected_classes: int | None,
                   expected_synsets: Sequence[str] | None) -> None:
    if not classes:
        raise SourceError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    if expected_synsets is not None:
        missing = sorted(set(expected_synsets) - set(classes))
        extra = sorted(set(classes) - set(expected_synsets))
        if missing or extra:
            raise SourceError(
                f"{root}: {len(classes)} class folders, expected the {len(expected_synsets)} synsets; "
                f"missing {len(missing)}: [{shown(missing)}]; extra {len(extra)}: [{shown(extra)}]"
            )
    if expected_classes is not None and len(classes) != expected_classes:
        odd = [name for name in classes if not WNID.fullmatch(name)]
        hint = f"; folders not named like a WordNet id (n########): [{shown(odd)}]" if odd else ""
        raise SourceError(f"{root}: {len(classes)} class folders, expected {expected_classes}{hint}")


def scan_imagefolder(
    root: str | Path, *, expected_classes: int | None = 1000, expected_synsets: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class folder names in sorted order, (file, class index) pairs) of an ImageFolder tree.

    Args:
        root: directory of one sub-directory per class.
        expected_classes: the number of class folders required (None: any number).
        expected_synsets: the exact folder names required (e.g. :func:`imagenet_synsets`); missing and extra
            folders are named in the error.
    Raises:
        SourceError: not a directory, wrong class folders, or a class folder without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory (expected an ImageFolder tree root/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    _check_classes(root, classes, expected_classes, expected_synsets)
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        images = list_images(root / name)
        if not images:
            raise SourceError(f"{root / name}: class folder {index} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += [(path, index) for path in images]
    return classes, files


def imagefolder_records(root: str | Path, **expected: object) -> tuple[list[str], list[Record]]:
    """(class folder names, a labelled record per image) of an ImageFolder tree (see :func:`scan_imagefolder`)."""
    classes, files = scan_imagefolder(root, **expected)
    return classes, [file_record(path, label=label, captions=False) for path, label in files]


def is_imagefolder(path: str | Path) -> bool:
    """True for a directory of class sub-directories holding images and no ``.tar`` shards at its top."""
    path = Path(path)
    if not path.is_dir() or any(path.glob("*.tar")):
        return False
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return any(list_images(d) for d in subdirs[:3])
