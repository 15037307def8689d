"""The demo's extra training sources (Open Clip Art, emoji) and the guard that keeps Tux Paint test images out.

These read the installed Debian packages (``make test`` installs them: openclipart-png, fonts-noto-color-emoji,
unicode-data, tuxpaint-stamps-default).
"""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.data.demo import DemoDataMissingError, build_demo_data
from vlp.data.demo_dedup import NearDuplicateIndex, drop_test_copies, fingerprint, fingerprint_file
from vlp.data.demo_emoji import (
    EMOJI_CANVAS,
    EMOJI_FONT_DEFAULT,
    EMOJI_TEST_DEFAULT,
    Emoji,
    load_font,
    parse_emoji_test,
    render_emoji,
)
from vlp.data.demo_openclipart import OPENCLIPART_DEFAULT_ROOT, clipart_caption, name_words, scan_clipart
from vlp.data.demo_tuxpaint import TUXPAINT_DEFAULT_ROOT, scan_stamps, split_stamps
from vlp.data.writer import SourceSample

EMOJI_TEST_EXCERPT = """\
# group: Animals & Nature

# subgroup: animal-mammal
1F998 ; fully-qualified # 🦘 E11.0 kangaroo
1F43F FE0F ; fully-qualified # 🐿️ E0.7 chipmunk
1F43F ; unqualified # 🐿 E0.7 chipmunk

# group: People & Body

# subgroup: person-role
1F468 200D 1F4BB ; fully-qualified # 👨‍💻 E4.0 man technologist
1F468 1F3FB 200D 1F4BB ; fully-qualified # 👨🏻‍💻 E4.0 man technologist: light skin tone
"""


def test_emoji_list_keeps_fully_qualified_without_skin_tones() -> None:
    scan = parse_emoji_test(EMOJI_TEST_EXCERPT)
    assert [(e.name, e.code, e.group, e.subgroup) for e in scan.emoji] == [
        ("kangaroo", "1F998", "Animals & Nature", "animal-mammal"),
        ("chipmunk", "1F43F FE0F", "Animals & Nature", "animal-mammal"),
        ("man technologist", "1F468 200D 1F4BB", "People & Body", "person-role"),
    ]
    assert dict(scan.skipped) == {"skin_tone_variant": 1}


def test_installed_emoji_list_is_large_and_named() -> None:
    scan = parse_emoji_test(EMOJI_TEST_DEFAULT.read_text(encoding="utf-8"))
    names = {e.name for e in scan.emoji}
    assert len(scan.emoji) > 1500 and {"kangaroo", "red heart", "flag: France", "pizza"} <= names
    assert scan.skipped["skin_tone_variant"] > 1000


def _colourful(image: Image.Image) -> bool:
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    alpha = np.asarray(image.getchannel("A")) > 0
    saturation = (rgb.max(axis=2) - rgb.min(axis=2))[alpha]
    return bool((saturation > 60).mean() > 0.2)


def test_emoji_render_in_colour_as_one_glyph_or_say_why_not() -> None:
    font = load_font(EMOJI_FONT_DEFAULT)
    for codepoints in ((0x1F998,), (0x1F468, 0x200D, 0x1F4BB), (0x1F1EB, 0x1F1F7)):  # kangaroo, ZWJ, flag
        image = render_emoji(Emoji(codepoints, "x", "g", "s"), font)
        assert isinstance(image, Image.Image) and image.size == (EMOJI_CANVAS, EMOJI_CANVAS)
        left, top, right, bottom = image.getbbox()
        assert right - left > 80 and bottom - top > 60, codepoints  # the glyph fills most of the canvas
        assert _colourful(image), codepoints
    assert render_emoji(Emoji((0x41,), "latin capital letter a", "g", "s"), font) == "no_glyph"  # not in the font
    assert render_emoji(Emoji((0x1F998, 0x1F998), "two kangaroos", "g", "s"), font) == "not_one_glyph"


def test_clipart_captions_come_from_file_and_folder_names() -> None:
    assert name_words("dog_05_drawn_with_strai_01") == ["dog", "05", "drawn", "with", "strai"]
    assert name_words("aircraft_jarno_vasamaa1") == ["aircraft", "jarno", "vasamaa1"]
    assert clipart_caption("animals/birds/acquila_architetto_franc_03.png") == "acquila architetto franc (birds)"
    assert clipart_caption("food/breads_and_carbs/muffin_3.png") == "muffin (breads and carbs)"
    assert clipart_caption("signs_and_symbols/flags/africa/mali.png") == "mali (africa)"
    assert clipart_caption("people/0001_02.png") == ""


def _png(path: Path, colour: str, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (size[0] // 2, size[1] // 2), colour), (3, 4))
    image.save(path)
    return path


def test_clipart_scan_skips_abstract_folders_and_wordless_names(tmp_path: Path) -> None:
    _png(tmp_path / "animals/mammals/canguro_01.png", "red")
    _png(tmp_path / "shapes/stars/star_95pt06step.png", "gold")
    _png(tmp_path / "computer/icons/lemon-theme/actions/int.png", "blue")
    _png(tmp_path / "people/0001_02.png", "green")
    scan = scan_clipart(tmp_path)
    assert [(c.relative_path, c.caption, c.category) for c in scan.stamps] == [
        ("animals/mammals/canguro_01.png", "canguro (mammals)", "animals/mammals")
    ]
    assert dict(scan.skipped) == {"abstract_folder": 2, "no_words": 1}


def test_installed_clipart_scan() -> None:
    scan = scan_clipart(OPENCLIPART_DEFAULT_ROOT)
    assert len(scan.stamps) > 3000 and scan.skipped["abstract_folder"] > 2000
    assert all(item.caption and item.png_path.is_file() for item in scan.stamps[:50])


def _test_stamps() -> list:
    return split_stamps(scan_stamps(TUXPAINT_DEFAULT_ROOT).stamps, "test")


def test_fingerprint_finds_resized_reencoded_copies_and_only_them() -> None:
    stamps = _test_stamps()
    index = NearDuplicateIndex(fingerprint_file(s.png_path) for s in stamps)
    copies = 0
    for stamp in stamps:
        with Image.open(stamp.png_path) as original:
            if min(original.size) < 96:
                continue
            flat = Image.alpha_composite(Image.new("RGBA", original.size, "white"), original.convert("RGBA"))
            for divisor in (2, 3):
                copy = flat.convert("RGB").resize((original.width // divisor, original.height // divisor))
                encoded = io.BytesIO()
                copy.save(encoded, format="JPEG", quality=80)
                assert index.contains(Image.open(encoded)), (stamp.relative_path, divisor)
                copies += 1
    assert copies > 100
    # The one real copy in the packages: Open Clip Art's candy is the Tux Paint test stamp "candy_cane", drawn larger.
    candy_cane = TUXPAINT_DEFAULT_ROOT / "seasonal/christmas/candy_cane.png"
    assert any(s.png_path == candy_cane for s in stamps)
    assert index.contains(Image.open(OPENCLIPART_DEFAULT_ROOT / "food/desserts/candy_10.png"))
    # Other pictures are not copies: the emoji (as rendered) and the first 200 clip-art images of the build.
    font = load_font(EMOJI_FONT_DEFAULT)
    rendered = (render_emoji(e, font) for e in parse_emoji_test(EMOJI_TEST_DEFAULT.read_text(encoding="utf-8")).emoji)
    assert not any(index.contains(image) for image in rendered if isinstance(image, Image.Image))
    clipart = scan_clipart(OPENCLIPART_DEFAULT_ROOT).stamps
    assert not any(index.contains(Image.open(c.png_path)) for c in clipart[:300] if "candy_10" not in c.relative_path)


def test_drop_test_copies_counts_by_reason(tmp_path: Path) -> None:
    stamp = _test_stamps()[0]
    index = NearDuplicateIndex([fingerprint_file(stamp.png_path)])
    other = _png(tmp_path / "other.png", "purple")
    samples = [
        SourceSample(caption="a copy", image_path=str(stamp.png_path)),
        SourceSample(caption=stamp.caption.upper() + " ", image_path=str(other)),  # same caption, normalised
        SourceSample(caption="something else", image_path=str(other)),
    ]
    skipped: Counter = Counter()
    kept = list(drop_test_copies(samples, index, [stamp.caption], skipped))
    assert [s.caption for s in kept] == ["something else"]
    assert dict(skipped) == {"tuxpaint_test_duplicate": 1, "tuxpaint_test_caption": 1}
    assert fingerprint(Image.open(other)).thumbnail.shape == (8 * 8 * 3,)


def _read_json_members(directory: Path) -> list[dict]:
    import tarfile

    rows = []
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            rows += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return rows


def test_build_keeps_a_tux_paint_test_stamp_out_of_extra_sources(tmp_path: Path) -> None:
    """A clip-art tree holding a copy of a Tux Paint test stamp: the copy is counted and never written."""
    stamp = _test_stamps()[0]
    clipart = tmp_path / "clipart"
    copy = clipart / "animals" / "a_copied_stamp_01.png"
    copy.parent.mkdir(parents=True)
    shutil.copy(stamp.png_path, copy)
    _png(clipart / "animals" / "purple_square_01.png", "purple")
    summary = build_demo_data(tmp_path / "out", progress=False, limit=3, openclipart_root=clipart)
    split = summary.split("openclipart", "train")
    assert split.inputs == 2 and split.samples == 1 and split.skipped == {"tuxpaint_test_duplicate": 1}
    written = _read_json_members(tmp_path / "out/openclipart/train")
    assert [row["file"] for row in written] == ["animals/purple_square_01.png"]
    assert [row["caption"] for row in written] == ["purple square (animals)"]
    emoji = _read_json_members(tmp_path / "out/emoji/train")
    assert len(emoji) == 3 and all(row["codepoints"] and row["group"] for row in emoji)
    demo = json.loads((tmp_path / "out/demo.json").read_text())
    assert demo["sources"]["openclipart/train"]["skipped"] == {"tuxpaint_test_duplicate": 1}


def test_missing_extra_sources_name_their_debian_packages(tmp_path: Path) -> None:
    with pytest.raises(DemoDataMissingError, match="Open Clip Art PNGs not found at .*openclipart-png"):
        build_demo_data(tmp_path / "out", openclipart_root=tmp_path / "nowhere", progress=False, limit=2)
    with pytest.raises(DemoDataMissingError, match="emoji font not found at .*fonts-noto-color-emoji"):
        build_demo_data(tmp_path / "out", emoji_font=tmp_path / "none.ttf", progress=False, limit=2)
    with pytest.raises(DemoDataMissingError, match=r"emoji-test\.txt\) not found at .*unicode-data"):
        build_demo_data(tmp_path / "out", emoji_names=tmp_path / "none.txt", progress=False, limit=2)
    assert not (tmp_path / "out").exists()  # nothing written before the check
