"""Emoji for the demo shards: Noto Color Emoji glyphs rendered with Pillow, captioned with their Unicode names.

Two Debian packages provide the inputs: ``fonts-noto-color-emoji`` (``NotoColorEmoji.ttf``, colour bitmaps with
one strike, 109 px, so Pillow renders it at that size only) and ``unicode-data`` (``emoji-test.txt``: every emoji
of the Unicode release with its CLDR short name, group and subgroup). Every *fully-qualified* emoji is taken in
file order: single code points, ZWJ sequences ("man technologist"), flags and keycaps, which Pillow's Raqm layout
joins into one glyph. Skipped, counted by reason: ``skin_tone_variant`` (the same picture with a skin tone
modifier; the default yellow one is kept), ``no_glyph`` (the rendering is blank) and ``not_one_glyph`` (the
sequence renders as several glyphs side by side, i.e. the font or the layout engine does not support it).

Each glyph is drawn in colour onto a transparent 136 x 136 canvas (the writer flattens it onto white, as it does
for the Tux Paint stamps). The caption is the CLDR name as written in ``emoji-test.txt`` ("kangaroo", "flag:
France"); the json has ``group``, ``subgroup`` and ``codepoints``. Rendering depends only on the font file and
Pillow, so a build is deterministic on a given machine.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlp.data.writer import SourceSample

EMOJI_FONT_DEFAULT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_DEFAULT = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_FONT_PIXELS = 109  # the font's only bitmap strike
EMOJI_CANVAS = 136  # the strike's advance width: every glyph fits
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
MAX_GLYPH_ASPECT = 1.5  # wider than this (width / height) = several glyphs side by side

# "1F468 200D 1F4BB ; fully-qualified # 👨‍💻 E4.0 man technologist"
_LINE = re.compile(r"^(?P<codes>[0-9A-F ]+?)\s*;\s*(?P<status>[a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(?P<name>.+)$")


@dataclass(frozen=True)
class Emoji:
    """One fully-qualified emoji: its code points, CLDR name and ``emoji-test.txt`` group and subgroup."""

    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        """The emoji as a string."""
        return "".join(chr(c) for c in self.codepoints)

    @property
    def code(self) -> str:
        """The code points in hex, as in ``emoji-test.txt`` (``1F468 200D 1F4BB``)."""
        return " ".join(f"{c:04X}" for c in self.codepoints)


@dataclass
class EmojiScan:
    """The emoji to render, in file order, and the count of skipped lines by reason."""

    emoji: list[Emoji] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def parse_emoji_test(text: str) -> EmojiScan:
    """The fully-qualified emoji of an ``emoji-test.txt`` text, without skin-tone variants."""
    scan, group, subgroup = EmojiScan(), "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.partition(":")[2].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.partition(":")[2].strip()
        elif (match := _LINE.match(line)) is not None:
            if match["status"] != "fully-qualified":
                continue  # the same emoji without its variation selector: listed again, fully qualified
            codepoints = tuple(int(code, 16) for code in match["codes"].split())
            if SKIN_TONES.intersection(codepoints):
                scan.skipped["skin_tone_variant"] += 1
                continue
            scan.emoji.append(Emoji(codepoints, match["name"].strip(), group, subgroup))
    return scan


def load_font(path: str | Path = EMOJI_FONT_DEFAULT) -> ImageFont.FreeTypeFont:
    """The colour emoji font at its bitmap size."""
    return ImageFont.truetype(str(path), EMOJI_FONT_PIXELS)


def render_emoji(emoji: Emoji, font: ImageFont.FreeTypeFont) -> Image.Image | str:
    """The emoji drawn in colour, centred on a transparent square canvas, or the reason it cannot be."""
    left, top, right, bottom = font.getbbox(emoji.text)
    width, height = right - left, bottom - top
    if width <= 0 or height <= 0:
        return "no_glyph"
    if width > MAX_GLYPH_ASPECT * height:
        return "not_one_glyph"
    canvas = Image.new("RGBA", (EMOJI_CANVAS, EMOJI_CANVAS), (255, 255, 255, 0))
    origin = ((EMOJI_CANVAS - width) // 2 - left, (EMOJI_CANVAS - height) // 2 - top)
    ImageDraw.Draw(canvas).text(origin, emoji.text, font=font, embedded_color=True)
    return canvas if canvas.getbbox() is not None else "no_glyph"


def png_bytes(image: Image.Image) -> bytes:
    """Encode ``image`` as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def emoji_samples(emoji: list[Emoji], font_path: str | Path, skipped: Counter) -> Iterator[SourceSample]:
    """One :class:`SourceSample` per emoji that renders as one glyph; the others are counted in ``skipped``."""
    font = load_font(font_path)
    for item in emoji:
        image = render_emoji(item, font)
        if isinstance(image, str):
            skipped[image] += 1
            continue
        yield SourceSample(
            caption=item.name,
            image_bytes=png_bytes(image),
            extra={"group": item.group, "subgroup": item.subgroup, "codepoints": item.code},
            source=f"emoji:{item.code}",
        )
