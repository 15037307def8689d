"""Where each demo data set comes from and under which terms: quoted from the Debian copyright files.

Every entry names the Debian package, its ``/usr/share/doc/<package>/copyright`` file and a passage of the notice
quoted from it (``tests/test_demo_data.py`` checks each quote against the installed file). ``vlp data demo``
copies this table into ``demo.json``.
"""

from __future__ import annotations

_MIT_NOTICE = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
    'associated documentation files (the "Software"), to deal in the Software without restriction, including '
    "without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell "
    "copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the "
    "following conditions: The above copyright notice and this permission notice shall be included in all copies "
    'or substantial portions of the Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, '
    "EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A "
    "PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR "
    "ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, "
    "OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE."
)
_GPL2_PLUS_NOTICE = (
    "This package is free software; you can redistribute it and/or modify it under the terms of the GNU General "
    "Public License as published by the Free Software Foundation; either version 2 of the License, or (at your "
    "option) any later version. This package is distributed in the hope that it will be useful, but WITHOUT ANY "
    "WARRANTY; without even the implied warranty of MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE. See the "
    "GNU General Public License for more details."
)
_PUBLIC_DOMAIN_NOTICE = (
    "The person or persons who have associated work with this document (the \"Dedicator\" or \"Certifier\") hereby "
    "either (a) certifies that, to the best of his knowledge, the work of authorship identified is in the public "
    "domain of the country from which the work is published, or (b) hereby dedicates whatever copyright the "
    "dedicators holds in the work of authorship identified below (the \"Work\") to the public domain."
)
_OFL_NOTICE = (
    "The OFL allows the licensed fonts to be used, studied, modified and redistributed freely as long as they are "
    "not sold by themselves. The fonts, including any derivative works, can be bundled, embedded, redistributed "
    "and/or sold with any software provided that any reserved names are not used by derivative works."
)
_UNICODE_NOTICE = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of the Unicode data files and any "
    "associated documentation (the \"Data Files\") or Unicode software and any associated documentation (the "
    "\"Software\") to deal in the Data Files or Software without restriction, including without limitation the "
    "rights to use, copy, modify, merge, publish, distribute, and/or sell copies of the Data Files or Software"
)
# Quoted from /usr/share/doc/<package>/copyright (Debian machine-readable copyright files).
DEMO_LICENCES = {
    "fashion_mnist": {
        "name": "Fashion-MNIST",
        "author": "Zalando Research",
        "copyright": "2017, Zalando SE, https:tech.zalando.com",
        "licence": "MIT (Expat)",
        "notice": _MIT_NOTICE,
        "upstream": "https://github.com/zalandoresearch/fashion-mnist",
        "debian_package": "dataset-fashion-mnist",
        "copyright_file": "/usr/share/doc/dataset-fashion-mnist/copyright",
    },
    "tuxpaint": {
        "name": "Tux Paint stamps (tuxpaint-stamps)",
        "author": "the Tux Paint project",
        "copyright": "2002-2022 by Bill Kendrick <bill@newbreedsoftware.com>",
        "licence": "GPL-2+ (GNU General Public License, version 2 or any later version)",
        "notice": _GPL2_PLUS_NOTICE,
        "upstream": "http://sourceforge.net/projects/tuxpaint",
        "debian_package": "tuxpaint-stamps-default",
        "copyright_file": "/usr/share/doc/tuxpaint-stamps-default/copyright",
    },
    "openclipart": {
        "name": "Open Clip Art Library (openclipart-png)",
        "author": "the Open Clip Art Library contributors (each image's author is in its file name)",
        "copyright": "creative commons Public Domain Dedication",
        "licence": "Public Domain Dedication (Creative Commons)",
        "notice": _PUBLIC_DOMAIN_NOTICE,
        "upstream": "http://www.openclipart.org",
        "debian_package": "openclipart-png",
        "copyright_file": "/usr/share/doc/openclipart-png/copyright",
    },
    "emoji": {
        "name": "Noto Color Emoji (the glyphs)",
        "author": "Google Inc.",
        "copyright": "2013-2017 Google Inc.",
        "licence": "SIL Open Font License 1.1",
        "notice": _OFL_NOTICE,
        "upstream": "https://github.com/googlefonts/noto-emoji",
        "debian_package": "fonts-noto-color-emoji",
        "copyright_file": "/usr/share/doc/fonts-noto-color-emoji/copyright",
    },
    "emoji_names": {
        "name": "Unicode emoji data (emoji-test.txt: the emoji captions)",
        "author": "Unicode, Inc.",
        "copyright": "1991-2005 Unicode, Inc.",
        "licence": "Unicode, Inc. License Agreement - Data Files and Software",
        "notice": _UNICODE_NOTICE,
        "upstream": "http://www.unicode.org/copyright.html",
        "debian_package": "unicode-data",
        "copyright_file": "/usr/share/doc/unicode-data/copyright",
    },
}
