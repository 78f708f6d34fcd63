"""A tqdm progress bar that can be switched off (tests, library calls) without ifs at call sites."""

from __future__ import annotations


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "img"):
    """``tqdm(total=...)`` when ``enabled``, else an object with the same ``update``/``close``."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit)
