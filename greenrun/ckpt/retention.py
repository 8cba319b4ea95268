"""Which committed checkpoints stay: one policy, the same on the local disk and in the bucket.

`keep_last` always means the newest N committed checkpoints (at least one: the newest is never deleted);
`keep_best` adds the N with the lowest finite validation loss; `protect` adds whatever a writer still needs
(the one just committed, one being uploaded).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Retention:
    keep_last: int  # newest committed checkpoints kept; values below 1 still keep the newest
    keep_best: int = 0  # plus this many with the lowest validation loss

    def keep(
        self, steps: Iterable[int], val_loss: Mapping[int, object] | None = None, protect: Iterable[int] = ()
    ) -> set[int]:
        """The steps to keep out of `steps` (committed ones, any order)."""
        newest_first = sorted(set(steps), reverse=True)
        kept = set(newest_first[: max(1, self.keep_last)]) | set(protect)
        losses = {s: loss for s, loss in (val_loss or {}).items() if s in newest_first}
        return kept | set(best(losses, self.keep_best))


def best(val_loss: Mapping[int, object], n: int) -> list[int]:
    """The n steps with the lowest finite validation loss, best first; ties go to the newer step."""
    scored = [
        (float(loss), -step)
        for step, loss in val_loss.items()
        if isinstance(loss, int | float) and not isinstance(loss, bool) and math.isfinite(loss)
    ]
    return [-neg for _, neg in sorted(scored)[: max(n, 0)]]
