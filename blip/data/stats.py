"""Counts that prove no sample was lost silently: input = used + skipped, by reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LoaderStats:
    """What a loader did with its input, in samples (tar samples = images) unless noted.

    - ``seen``: samples taken from shards (with repeats, a sample read twice counts twice);
    - ``used``: samples accepted (decoded, with at least one non-empty caption) and handed on;
    - ``skipped``: reason -> samples dropped (e.g. ``undecodable_image``, ``missing_caption``);
    - ``converted``: reason -> samples used after a repair (``mode_CMYK``, ``image_downscaled``,
      ``caption_not_utf8``, ``caption_truncated`` ...); a sample may have several repairs;
    - ``shard_errors``: reason -> shard reads that ended in damage (``truncated_tar``, ...);
    - ``pairs``: (image, caption) pairs put into batches; ``batches``: batches yielded.

    Invariant (``check``): ``seen == used + sum(skipped.values())``. In a repeated (training)
    epoch, up to ``shuffle_buffer`` accepted pairs may still sit in the buffer at the epoch cut,
    so ``pairs`` can be less than the pairs of ``used`` samples.
    """

    seen: int = 0
    used: int = 0
    pairs: int = 0
    batches: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    shard_errors: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.seen += 1
        self.skipped[reason] += 1

    def to_dict(self) -> dict:
        return {
            "seen": self.seen, "used": self.used, "pairs": self.pairs, "batches": self.batches,
            "skipped": dict(self.skipped), "converted": dict(self.converted), "shard_errors": dict(self.shard_errors),
        }

    def add(self, other: "LoaderStats | dict") -> None:
        d = other.to_dict() if isinstance(other, LoaderStats) else other
        self.seen += d["seen"]
        self.used += d["used"]
        self.pairs += d["pairs"]
        self.batches += d["batches"]
        self.skipped.update(d["skipped"])
        self.converted.update(d["converted"])
        self.shard_errors.update(d["shard_errors"])

    def take(self) -> dict:
        """Return the counts as a dict and reset to zero (a delta to ship with a batch)."""
        d = self.to_dict()
        self.__init__()
        return d

    def check(self) -> None:
        """Raise if a sample is unaccounted for."""
        if self.seen != self.used + sum(self.skipped.values()):
            raise AssertionError(f"loader lost samples: seen {self.seen} != used {self.used} + skipped {dict(self.skipped)}")

    def summary(self) -> str:
        """One human-readable line."""
        parts = [f"seen {self.seen}", f"used {self.used}", f"pairs {self.pairs}"]
        parts.append("skipped " + (", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"))
        if self.converted:
            parts.append("converted " + ", ".join(f"{k} {v}" for k, v in sorted(self.converted.items())))
        if self.shard_errors:
            parts.append("shard errors " + ", ".join(f"{k} {v}" for k, v in sorted(self.shard_errors.items())))
        return "; ".join(parts)
