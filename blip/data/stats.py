"""Counts that prove no sample was lost silently: input = used + skipped, by reason."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

NAMED_CAP = 1000  # skipped samples named one by one; the counts go on beyond it
SHOW = 5  # names shown in a log line


class DataError(ValueError):
    """The input data cannot be used as it is (too much skipped, nothing readable)."""


def shard_label(url: str) -> str:
    """``/x/data/web/00003.tar`` -> ``web/00003.tar``: enough to find it, short enough to log."""
    url = str(url)
    return f"{os.path.basename(os.path.dirname(url))}/{os.path.basename(url)}" if url else ""


def _first(title: str, items: list[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    more = f" and {total - SHOW} more" if total > SHOW else ""
    return f"{title} ({total}): " + ", ".join(items[:SHOW]) + more


@dataclass
class LoaderStats:
    """What a loader did with its input, in samples (tar samples = images) unless noted.

    - ``seen``: samples taken from shards (with repeats, a sample read twice counts twice);
    - ``used``: samples accepted (decoded, with at least one non-empty caption) and handed on;
    - ``skipped``: reason -> samples dropped (e.g. ``undecodable_image``, ``missing_caption``);
    - ``converted``: reason -> samples used after a repair (``mode_CMYK``, ``image_downscaled``,
      ``caption_not_utf8``, ``caption_truncated`` ...); a sample may have several repairs;
    - ``shard_errors``: reason -> shard reads that ended in damage (``truncated_tar``, ...);
    - ``pairs``: (image, caption) pairs put into batches; ``batches``: batches yielded;
    - ``damaged``: shard -> what went wrong reading it (``truncated_tar: ...``), every damaged shard;
    - ``named``: ``[shard, key, reason]`` of skipped samples, the first ``NAMED_CAP`` of them (the
      counts in ``skipped`` stay complete beyond it).

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
    damaged: dict = field(default_factory=dict)
    named: list = field(default_factory=list)

    def skip(self, reason: str, sample=None) -> None:
        """Count a skipped sample; ``sample`` (anything with ``url`` and ``key``) names it."""
        self.seen += 1
        self.skipped[reason] += 1
        if sample is not None and len(self.named) < NAMED_CAP:
            self.named.append([shard_label(getattr(sample, "url", "")), str(getattr(sample, "key", "")), reason])

    def shard_damaged(self, url: str, reason: str, detail: str = "") -> None:
        self.shard_errors[reason] += 1
        self.damaged[str(url)] = f"{reason}: {detail}" if detail else reason

    def to_dict(self) -> dict:
        return {
            "seen": self.seen, "used": self.used, "pairs": self.pairs, "batches": self.batches,
            "skipped": dict(self.skipped), "converted": dict(self.converted), "shard_errors": dict(self.shard_errors),
            "damaged": dict(self.damaged), "named": list(self.named),
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
        self.damaged.update(d.get("damaged", {}))
        self.named.extend(d.get("named", [])[: max(0, NAMED_CAP - len(self.named))])

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
        if self.damaged:
            parts.append(_first("damaged shards", [f"{u} ({why})" for u, why in sorted(self.damaged.items())]))
        if self.named:
            parts.append(_first("skipped samples", [f"{sh}/{key} ({why})" for sh, key, why in self.named],
                                 sum(self.skipped.values())))
        return "; ".join(parts)

    def skipped_fraction(self) -> float:
        return sum(self.skipped.values()) / self.seen if self.seen else 0.0

    def check_ceiling(self, ceiling: float | None, what: str, min_seen: int = 50) -> None:
        """Raise when more than ``ceiling`` of the samples seen were skipped (at least ``min_seen``
        seen, so a few bad samples at the start do not trip it), naming the top reasons and shards."""
        if ceiling is None or self.seen < min_seen or self.skipped_fraction() <= ceiling:
            return
        top = ", ".join(f"{k} {v}" for k, v in self.skipped.most_common(3))
        shards = Counter(sh for sh, _, _ in self.named).most_common(3)
        raise DataError(
            f"{what}: {sum(self.skipped.values())} of {self.seen} samples skipped ({self.skipped_fraction():.0%} > the "
            f"ceiling {ceiling:.0%}); top reasons: {top}; most affected shards: "
            f"{', '.join(f'{sh} ({n})' for sh, n in shards) or 'n/a'}"
            + (f"; damaged shards: {', '.join(sorted(self.damaged)[:3])}" if self.damaged else "")
            + ". Check the data (python -m blip.data inspect <shards>) or raise max_skipped_fraction")
