"""Counts of everything the loader drops, by reason: nothing is lost silently."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping

logger = logging.getLogger("vlp.data")

# Sample-level reasons (one sample dropped each).
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_TOO_LONG = "caption_too_long"
UNDECODABLE_IMAGE = "undecodable_image"
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_FORMAT_MISMATCH = "image_format_mismatch"  # e.g. a TIFF named .jpg: only the format the name says is decoded
BAD_JSON = "bad_json"
# Member-level reasons (a tar member ignored; the sample may survive without it).
UNSAFE_MEMBER_NAME = "unsafe_member_name"
IGNORED_MEMBER = "ignored_member"
NON_REGULAR_MEMBER = "non_regular_member"  # a symlink, hard link or device entry: never followed or read
# Shard-level reasons.
CORRUPT_SHARD = "corrupt_shard"
UNREADABLE_SHARD = "unreadable_shard"
LOST_IN_CORRUPT_SHARD = "lost_in_corrupt_shard"  # samples known lost (a manifest counts them)
UNKNOWN_LOSS = "shard_with_unknown_loss"  # a damaged shard without a manifest: how many samples it lost is unknown
SHARD_READ_ERROR = "shard_read_error"  # the storage kept failing (read error, failing pipe: command) after retries

# Reasons that log a warning every time (they are rare and mean the data set is damaged).
_LOUD_REASONS = (CORRUPT_SHARD, UNREADABLE_SHARD, SHARD_READ_ERROR, LOST_IN_CORRUPT_SHARD, UNKNOWN_LOSS,
                 UNSAFE_MEMBER_NAME)
_QUIET_LOG_LIMIT = 5


class SkipCounters:
    """Per-reason counts of dropped samples, members and shards, with rate-limited warnings."""

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self.counts: Counter[str] = Counter(counts or {})

    def add(self, reason: str, where: str, amount: int = 1, detail: str = "") -> None:
        """Count ``amount`` drops for ``reason`` and log where they happened."""
        self.counts[reason] += amount
        message = f"skipped ({reason}) {amount if amount != 1 else ''} at {where}{': ' + detail if detail else ''}"
        if reason in _LOUD_REASONS or self.counts[reason] <= _QUIET_LOG_LIMIT:
            logger.warning(message.replace("  ", " "))
        elif self.counts[reason] == _QUIET_LOG_LIMIT + 1:
            logger.warning("further %s skips are counted but not logged", reason)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))



def sum_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Add several ``{reason: count}`` dicts."""
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return dict(sorted(total.items()))
