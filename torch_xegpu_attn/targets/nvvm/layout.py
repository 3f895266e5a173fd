"""Layouts of a work-group's vectors over the threads of a CUDA thread block.

The shared IR's work-group holds 2-D tiles (rows x columns) and row vectors.
On the GPU a thread block of W warps owns the work-group; warp w owns rows
[16 * mt * w, 16 * mt * (w + 1)) in mt m-tiles of 16 rows, and within a warp
each lane holds the elements of the tensor-core accumulator layout of
mma.sync m16n8k16:

    tile slot (m, j, i), i in 0..3:   row = base + 16 m + lane / 4 + 8 (i / 2)
                                      col = 8 j + 2 (lane % 4) + i % 2
    rows slot (m, h),    h in 0..1:   row = base + 16 m + lane / 4 + 8 h
    cols slot (j, c),    c in 0..1:   col = 8 j + 2 (lane % 4) + c

A vector value is distributed over one of these slot spaces: its Layout
says, for each of its dims, which coordinate indexes it: the row, the
column, the row divided or taken modulo a constant (packed query heads: rows
(g, l) flattened), or nothing (a unit dim).  A value then lives as one
scalar per slot.  Broadcasts and shape casts move between layouts without
moving data: a tile slot reads the rows slot (m, i / 2) or the cols slot
(j, i % 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

ROW, COL, ROW_DIV, ROW_MOD, UNIT = "row", "col", "row_div", "row_mod", "unit"


@dataclass(frozen=True)
class Axis:
    """What indexes one vector dim: kind in (row, col, row_div, row_mod, unit); arg: the divisor."""

    kind: str
    arg: int = 0

    def uses_row(self) -> bool:
        return self.kind in (ROW, ROW_DIV, ROW_MOD)


@dataclass(frozen=True)
class Layout:
    """A distributed vector: one Axis per dim, and the column extent of its slot space."""

    axes: Tuple[Axis, ...]
    columns: int = 0  # extent of the col axis (0 when no dim is a col)

    @property
    def space(self) -> str:
        rows = any(a.uses_row() for a in self.axes)
        cols = any(a.kind == COL for a in self.axes)
        return "tile" if rows and cols else "rows" if rows else "cols" if cols else "scalar"

    def text(self) -> str:
        """The layout as the IR dumps show it (`parse_layout` reads it back): the slot space, then
        per dim what indexes it (row, col, row/G, row%R, 1 for a unit dim), then the columns,
        e.g. "tile[row, col] cols=64" or "rows[row/16, row%16]"."""
        axes = ", ".join(_AXIS_TEXT[a.kind].format(a.arg) for a in self.axes)
        return f"{self.space}[{axes}]" + (f" cols={self.columns}" if self.columns else "")


_AXIS_TEXT = {ROW: "row", COL: "col", ROW_DIV: "row/{}", ROW_MOD: "row%{}", UNIT: "1"}
_LAYOUT_TEXT = re.compile(r"^(tile|rows|cols|scalar)\[(.*)\](?: cols=(\d+))?$")


def _parse_axis(text: str) -> Axis:
    for kind, pattern in ((ROW_DIV, "row/"), (ROW_MOD, "row%")):
        if text.startswith(pattern) and text[len(pattern):].isdigit():
            return Axis(kind, int(text[len(pattern):]))
    kinds = {"row": ROW, "col": COL, "1": UNIT}
    if text not in kinds:
        raise ValueError(f"not a layout axis: {text!r}")
    return Axis(kinds[text])


def parse_layout(text: str) -> Layout:
    """The Layout of `Layout.text()`; ValueError for anything else."""
    match = _LAYOUT_TEXT.match(text.strip())
    if match is None:
        raise ValueError(f"not a layout: {text!r}")
    space, axes, columns = match.groups()
    layout = Layout(tuple(_parse_axis(a.strip()) for a in axes.split(",") if a.strip()), int(columns or 0))
    if layout.space != space:
        raise ValueError(f"layout {text!r}: its axes make a {layout.space} layout")
    return layout


@dataclass(frozen=True)
class Geometry:
    """The thread block of a work-group: warps, m-tiles per warp, rows.

    q_in_registers: a staged left operand used in a loop (Q) is loaded into
    registers once (True) or re-read from shared memory at each use (False:
    fewer registers, more ldmatrix).
    prefetch: which staged tiles of a loop are copied a step ahead
    (ScheduleOptions.prefetch).
    warpgroup_mma: contractions with a staged right operand run as wgmma
    (ScheduleOptions.warpgroup_mma): warps 4g..4g+3 are warpgroup g, whose
    m-tile m of each warp is one m64 operand of an instruction (A from
    registers: any 16 rows a warp holds are that warp's rows of it).
    mma_overlap: (with warpgroup_mma) a wgmma chain's result is waited for
    at its first use, not at its issue (NvvmOptions.mma_overlap).
    """

    warps: int
    m_tiles: int
    q_in_registers: bool = True
    prefetch: str = "keys"
    warpgroup_mma: bool = False
    mma_overlap: bool = False

    def __post_init__(self) -> None:
        if self.warpgroup_mma and self.warps % 4:
            raise ValueError(f"nvvm: warpgroup MMA needs whole warpgroups (4 warps each), got {self.warps} warps")
        if self.mma_overlap and not self.warpgroup_mma:
            raise ValueError("nvvm: mma_overlap needs warpgroup_mma (wgmma is asynchronous, mma.sync is not)")

    @property
    def rows(self) -> int:
        return 16 * self.m_tiles * self.warps

    @property
    def copies_every_tile_ahead(self) -> bool:
        """Whether a loop's staged tiles (K and V) are all copied a step ahead, the first step's
        before the loop ("tiles", "tiles-late"), or only the first (K: "keys")."""
        return self.prefetch in ("tiles", "tiles-late")

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def slots(self, layout: Layout) -> List[tuple]:
        space = layout.space
        if space == "tile":
            return [(m, j, i) for m in range(self.m_tiles) for j in range(layout.columns // 8) for i in range(4)]
        if space == "rows":
            return [(m, h) for m in range(self.m_tiles) for h in range(2)]
        if space == "cols":
            return [(j, c) for j in range(layout.columns // 8) for c in range(2)]
        return [()]


def project_slot(slot: tuple, source_space: str, target_space: str) -> tuple:
    """The slot of `target_space` that holds the element a `source_space` slot needs
    (target_space has fewer varying coordinates: a broadcast source)."""
    if source_space == target_space:
        return slot
    if target_space == "scalar":
        return ()
    if source_space == "tile":
        m, j, i = slot
        return (m, i // 2) if target_space == "rows" else (j, i % 2)
    raise ValueError(f"no projection from {source_space} to {target_space}")


def layout_for_shape(shape: Sequence[int], rows: int) -> Optional[Layout]:
    """The natural layout of a row-leading vector: (rows,) -> rows; (rows, n) -> tile; unit dims
    around them (a (1, rows, n) write of the split-key combine) are unit axes."""
    if any(size == 1 for size in shape) and rows != 1:
        core = layout_for_shape([size for size in shape if size != 1], rows)
        if core is None:
            return None
        axes = iter(core.axes)
        return _with_columns(tuple(Axis(UNIT) if size == 1 else next(axes) for size in shape), core.columns)
    if len(shape) == 1 and shape[0] == rows:
        return Layout((Axis(ROW),))
    if len(shape) == 2 and shape[0] == rows and shape[1] % 8 == 0:
        return Layout((Axis(ROW), Axis(COL)), columns=shape[1])
    # Rows split in two (packed GQA: groups x rows per group), with or without columns.
    if len(shape) == 2 and shape[0] * shape[1] == rows:
        return shape_cast_layout(Layout((Axis(ROW),)), [rows], shape)
    if len(shape) == 3 and shape[0] * shape[1] == rows and shape[2] % 8 == 0:
        return shape_cast_layout(Layout((Axis(ROW), Axis(COL)), columns=shape[2]), [rows, shape[2]], shape)
    return None


def broadcast_source_layout(result: Layout, result_shape: Sequence[int], source_shape: Sequence[int]) -> Layout:
    """vector.broadcast source of shape `source_shape` into `result`: the leading dims it lacks
    are dropped, its unit dims that stretch become unit axes."""
    lead = len(result_shape) - len(source_shape)
    axes = []
    for d, size in enumerate(source_shape):
        axis = result.axes[lead + d]
        axes.append(Axis(UNIT) if size == 1 and result_shape[lead + d] != 1 else axis)
    return _with_columns(tuple(axes), result.columns)


def _with_columns(axes: Tuple[Axis, ...], columns: int) -> Layout:
    return Layout(axes, columns if any(a.kind == COL for a in axes) else 0)


def shape_cast_layout(known: Layout, known_shape: Sequence[int], other_shape: Sequence[int]) -> Layout:
    """The layout of the other side of a vector.shape_cast between `known_shape` (laid out as
    `known`) and `other_shape`: unit dims come and go; one row dim of G * R splits into
    (G, R) as (row div R, row mod R), or the two merge back."""
    parts = [(size, axis) for size, axis in zip(known_shape, known.axes) if size != 1]
    other = [size for size in other_shape if size != 1]
    axes_out: List[Axis] = []
    i = 0
    for size in other:
        if i >= len(parts):
            raise ValueError(f"shape_cast {known_shape} -> {other_shape} is not a reshape of rows/cols")
        psize, paxis = parts[i]
        if psize == size:
            axes_out.append(paxis)
            i += 1
        elif psize > size and paxis.kind == ROW and psize % size == 0:
            # one row dim splits: (G * R) -> (G, R); this dim is G = psize / size.. or R
            inner = psize // size
            axes_out.append(Axis(ROW_DIV, inner))
            parts[i] = (inner, Axis(ROW_MOD, inner))
        elif i + 1 < len(parts) and psize * parts[i + 1][0] == size and paxis.kind == ROW_DIV \
                and parts[i + 1][1].kind == ROW_MOD:
            axes_out.append(Axis(ROW))
            i += 2
        else:
            raise ValueError(f"shape_cast {known_shape} -> {other_shape} is not a reshape of rows/cols")
    if i != len(parts):
        raise ValueError(f"shape_cast {known_shape} -> {other_shape} is not a reshape of rows/cols")
    it = iter(axes_out)
    axes = tuple(Axis(UNIT) if size == 1 else next(it) for size in other_shape)
    return _with_columns(axes, known.columns)
