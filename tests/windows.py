"""Over-admission in any window: how many requests too many the busiest window [a, b] admitted.

A request is known to have been admitted inside [a, b] when it was asked at or after a and answered
by b, whichever clock the store decided on, so the count is a lower bound of what the store admitted in
that window and needs no tolerance for timing: GCRA allows floor((b - a) x rate) + burst there.
Only windows from one request's asking to another's answer need checking: any other window admits no
more than the tightest such window inside it.
"""

from __future__ import annotations

import numpy as np


def over_admission(admitted: list[tuple[float, float]], rate: float, burst: int) -> int:
    """The most by which any window [asked_i, answered_j] exceeds GCRA's bound (0: none does)."""
    if not admitted:
        return 0
    pairs = np.array(sorted(admitted))
    asked, answered = pairs[:, 0], pairs[:, 1]
    worst = 0
    for i in range(len(asked)):
        # Requests asked at or after asked[i] (they follow i in asking order), by when answered: the
        # k-th of them closes a window [asked[i], its answer] that holds at least k requests.
        ends = np.sort(answered[i:])
        held = np.arange(1, len(ends) + 1)
        allowed = np.floor((ends - asked[i]) * rate + 1e-6) + burst
        worst = max(worst, int((held - allowed).max()))
    return worst
