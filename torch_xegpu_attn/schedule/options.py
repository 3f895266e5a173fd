"""Options of the shared schedule.  A target fills them; the schedule never guesses.

Only what the shared stages read is here; a target's own knobs live in its TargetOptions
(targets/base.py), next to these.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

#: how the QK^T contraction gets K (ScheduleOptions.k_layout).
K_LAYOUTS = ("folded", "explicit", "materialized")
#: how key tails are handled (ScheduleOptions.tail).
TAIL_MODES = ("mask", "peel")
#: how a backward kernel computes dQ (ScheduleOptions.backward_dq).
BACKWARD_DQ = ("second_pass", "per_head")
#: the orientation of the dK/dV loops' tiles (ScheduleOptions.backward_tiles).
BACKWARD_TILES = ("rows_by_keys", "keys_by_rows")
#: whether dK and dV share a loop (ScheduleOptions.backward_dkv).
BACKWARD_DKV = ("together", "apart")
#: how the backward sums Delta = rowsum(dOut * Out) (ScheduleOptions.backward_delta).
BACKWARD_DELTA = ("reduction", "chain")


@dataclass(frozen=True)
class ScheduleOptions:
    """How the shared stages cut the problem; chosen per spec by the target.

    row_tile        query rows (of L) per work-group and query head.  With
                    `pack_gqa` a work-group holds G * row_tile rows.  Rows past
                    L in the last row tile are padded: computed on zeros, never
                    stored.
    kv_tile         keys per step of the flash loop.
    k_layout        how the QK^T contraction reads K:
                      "folded"        the K tile (kv_tile x E) as loaded; the
                                      contraction is (m,k) x (n,k) (what
                                      ldmatrix and dot products want);
                      "explicit"      the K tile as loaded, then an explicit
                                      vector.transpose to (E x kv_tile) and a
                                      row-major contraction (what XeGPU's
                                      vector-to-xegpu conversion takes);
                      "materialized"  K^T is written once per key/value head
                                      into a workspace by a loop of its own and
                                      read as (E x kv_tile) tiles (a CPU wants
                                      unit-stride K^T rows).
    pv_in_f32       True: P.V multiplies in f32 (V tiles of f16/bf16 inputs are
                    extended); False: P is rounded to the input type first (what
                    f16/bf16 matrix engines take).  Accumulation is f32 either way
                    (f64 for float64 inputs, for which the flag has no effect).
    tail            "mask": one loop over ceil(S / kv_tile) full tiles; the
                    last reads past S as zeros and masks keys >= S to -inf.
                    "peel": the tiles wholly below S in a loop with in-bounds
                    reads and no key check, then the last, partial tile (if
                    any) peeled into a second loop of at most one step, masked
                    as in "mask".  Full tiles only in both; query rows are
                    full tiles (rows past L padded) in both.
    pack_gqa        the G query heads of one key/value head are one work-group's
                    rows (K and V tiles are read once per group).
    kv_splits       P > 1: the key range of each row tile is split over P
                    work-groups, each keeping partial (max, sum, accumulator);
                    a combine loop merges them (log-sum-exp merge).
    split_fill      0: P = kv_splits.  > 0: P is chosen at run time, the
                    fewest splits that make split_fill work-groups in all, but
                    at most kv_splits, at most one per split_min_keys keys,
                    and at least 1 (a GPU target fills its chip with them).
    split_min_keys  the fewest keys worth a split of their own (split_fill > 0).
    combine_cols    value columns per work-group of the combine loop (0, or one
                    that does not divide Ev: all Ev); fewer columns make more,
                    shorter work-groups.
    rescale_threshold  0: the running maximum follows every key tile and the
                    accumulator is rescaled at every step.  t > 0: a row's
                    maximum is updated only when a tile's exceeds it by more
                    than t (in base-2 units of the exponent), so exponentials
                    stay <= 2^t; the final normalization is exact either way.
                    Rows that kept their maximum keep their accumulator as is
                    (a select: a GPU target skips the rescale where no row of
                    a warp grew, as FlashAttention-4 does with t = 8).
    backward_dq     how a backward kernel gets dQ; both are deterministic (every
                    gradient element written by one work-group, no atomics):
                      "second_pass"  a loop of its own over (b, h, g, row tile)
                                     work-groups, each over the key tiles,
                                     recomputing the scores and dP (seven
                                     tile contractions per (rows, keys) tile
                                     pair instead of five; every work-group
                                     count a GPU wants);
                      "per_head"     a work-group owns a key/value head: it
                                     goes over the key tiles once, and dQ is
                                     accumulated in an f32 workspace as they
                                     go by (five contractions; B * H
                                     work-groups, what a CPU's few threads
                                     fill).
    backward_tiles  the orientation of the score-shaped tiles where dK and dV
                    are accumulated:
                      "rows_by_keys"  (query rows x keys) as in the dQ loop;
                                      dV += P^T dOut and dK += dS^T Q contract
                                      P and dS with transposed maps;
                      "keys_by_rows"  (keys x query rows): S^T = K Q^T, so that
                                      P^T and dS^T are plain left operands of
                                      their contractions, tiles of the
                                      work-group's rows (its keys), what a
                                      tensor core's register operands need;
                                      lse and Delta broadcast along columns.
    backward_dkv    with backward_dq "second_pass": "together", one loop over key
                    tiles accumulates dK and dV; "apart", a loop for each (each
                    recomputes the scores and P; dV's needs no dP): a work-group
                    holds half the accumulators (a GPU's registers at wide
                    heads) for one more contraction per tile pair.
    backward_delta  how Delta = rowsum(dOut * Out) is summed:
                      "reduction"  a row reduction of the product tile (what a
                                   GPU distributes: per-lane sums, then
                                   shuffles across a row's lanes);
                      "chain"      one FMA chain over the value columns from
                                   zero, the order in which a contraction
                                   lowered to one FMA per k step sums dP =
                                   dOut V^T: where a row sees one key, Delta
                                   equals dP to the bit and dS is exactly 0.
    """

    row_tile: int
    kv_tile: int
    k_layout: str = "folded"
    pv_in_f32: bool = True
    tail: str = "mask"
    pack_gqa: bool = False
    kv_splits: int = 1
    split_fill: int = 0
    split_min_keys: int = 1
    combine_cols: int = 0
    rescale_threshold: float = 0.0
    backward_dq: str = "second_pass"
    backward_tiles: str = "rows_by_keys"
    backward_dkv: str = "together"
    backward_delta: str = "reduction"

    def __post_init__(self) -> None:
        if self.row_tile < 1 or self.kv_tile < 1:
            raise ValueError(f"tile sizes must be positive: {self}")
        if self.k_layout not in K_LAYOUTS:
            raise ValueError(f"k_layout must be one of {K_LAYOUTS}, got {self.k_layout!r}")
        if self.tail not in TAIL_MODES:
            raise ValueError(f"tail must be one of {TAIL_MODES}, got {self.tail!r}")
        if self.kv_splits < 1:
            raise ValueError(f"kv_splits must be >= 1, got {self.kv_splits}")
        if self.split_fill < 0 or self.split_min_keys < 1 or self.combine_cols < 0:
            raise ValueError(f"split_fill and combine_cols must be >= 0 and split_min_keys >= 1: {self}")
        if self.backward_dq not in BACKWARD_DQ:
            raise ValueError(f"backward_dq must be one of {BACKWARD_DQ}, got {self.backward_dq!r}")
        if self.backward_tiles not in BACKWARD_TILES:
            raise ValueError(f"backward_tiles must be one of {BACKWARD_TILES}, got {self.backward_tiles!r}")
        if self.backward_dkv not in BACKWARD_DKV:
            raise ValueError(f"backward_dkv must be one of {BACKWARD_DKV}, got {self.backward_dkv!r}")
        if self.backward_delta not in BACKWARD_DELTA:
            raise ValueError(f"backward_delta must be one of {BACKWARD_DELTA}, got {self.backward_delta!r}")
        if not 0 <= self.rescale_threshold <= 15:  # exponentials up to 2^t must fit f16 (P.V operand)
            raise ValueError(f"rescale_threshold must be in [0, 15], got {self.rescale_threshold}")

    def to_json(self) -> str:
        """Stable text form (part of the cache key)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def short_name(self) -> str:
        parts = [f"r{self.row_tile}", f"kv{self.kv_tile}", self.k_layout, self.tail]
        if self.pack_gqa:
            parts.append("packed")
        if self.kv_splits > 1:
            parts.append(f"split{self.kv_splits}")
            if self.split_fill:
                parts.append(f"fill{self.split_fill}-min{self.split_min_keys}")
            if self.combine_cols:
                parts.append(f"combine{self.combine_cols}")
        if not self.pv_in_f32:
            parts.append("pv-lowp")
        if self.rescale_threshold:
            parts.append(f"lazy{self.rescale_threshold:g}")
        if self.backward_dq != "second_pass":
            parts.append(self.backward_dq.replace("_", "-"))
        if self.backward_tiles != "rows_by_keys":
            parts.append(self.backward_tiles.replace("_", "-"))
        if self.backward_dkv != "together":
            parts.append(f"dkv-{self.backward_dkv}")
        if self.backward_delta != "reduction":
            parts.append(f"delta-{self.backward_delta}")
        return "_".join(parts)
