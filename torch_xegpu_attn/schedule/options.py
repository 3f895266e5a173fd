"""Options of the shared schedule.  A target fills them; the schedule never guesses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class ScheduleOptions:
    """How the shared stages cut the problem; chosen per spec by the target.

    row_tile        query rows per work-group (one scf.forall iteration).
    kv_tile         keys per step of the flash loop.
    fuse_k_transpose
                    True: K^T is computed inside each work-group from K (a GPU
                    reads K with transposed loads).  False: K^T is materialized
                    once by its own parallel loop (a CPU wants unit-stride
                    K^T rows for its broadcast-FMA micro-kernel).
    transpose_tile  (e, s) tile of the materialized transpose's inner loops,
                    or None to transpose a whole (e, s) slice at once.
    pv_in_f32       True: P.V multiplies in f32 (V tiles of f16/bf16 inputs are
                    extended); False: P is rounded to the input type first (what
                    f16/bf16 matrix engines take).  Accumulation is f32 either way.
    """

    row_tile: int
    kv_tile: int
    fuse_k_transpose: bool = False
    transpose_tile: Optional[Tuple[int, int]] = None
    pv_in_f32: bool = True

    def __post_init__(self) -> None:
        if self.row_tile < 1 or self.kv_tile < 1:
            raise ValueError(f"tile sizes must be positive: {self}")
