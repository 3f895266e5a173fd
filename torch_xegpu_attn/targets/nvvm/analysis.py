"""Layout assignment: which Layout(s) each vector value of a work-group is distributed in.

Anchors fix layouts: a contraction's result is a tile, a row reduction's a
row vector; loop-carried values take the layout of what is yielded.  From
there layouts flow forward through elementwise ops, shape casts and
broadcasts, and demands flow backward: a consumer in layout L demands its
elementwise operands in L, a broadcast's source in L projected onto the
source's dims, a shape cast's source in L reshaped.  A value may be demanded
in several layouts (an iota used both as a row index and as a key index): it
is then materialized once per layout.  Splat constants and broadcasts of
scalars are uniform: one scalar serves every layout.

Operands of tensor-core contractions that are read from memory (the Q, K and
V tiles) are not distributed at all: they are staged in shared memory
(`STAGED`).

The assignment is the stage "nvvm-layouts" of its own: `annotate_layouts`
writes what it decided on the ops (`attn.layouts`: per result, its layouts as
`Layout.text()` gives them, "staged", "uniform", "none" or "-" for a scalar),
which the IR dump of that stage shows, and the distribution reads them back
(`LayoutAnalysis.from_annotations`), so the dump is what the kernels were
built from.
"""

from __future__ import annotations

from typing import Dict, List, Set

from mlir import ir

from ...mlir_utils import CompileError, defining_op

from .layout import Layout, broadcast_source_layout, layout_for_shape, parse_layout, shape_cast_layout

ELEMENTWISE_PREFIXES = ("arith.", "math.")
STAGED = "staged"
#: the attribute that carries an op's assigned layouts, one string per result.
LAYOUTS_ATTR = "attn.layouts"
_UNIFORM, _NONE, _SCALAR = "uniform", "none", "-"


def vector_shape(value: ir.Value):
    t = value.type
    return list(ir.VectorType(t).shape) if isinstance(t, ir.VectorType) else None


def is_uniform(value: ir.Value) -> bool:
    """A vector with the same value in every element, computed from scalars only."""
    op = defining_op(value)
    if op is None:
        return False
    if op.name == "arith.constant":
        attr = op.attributes["value"]
        return isinstance(attr, ir.DenseElementsAttr) and attr.is_splat
    if op.name == "vector.broadcast":
        return vector_shape(op.operands[0]) is None or is_uniform(op.operands[0])
    return False


def _ops(block: ir.Block) -> List[ir.Operation]:
    """Every op under `block`, pre-order."""
    found = []
    for op in block.operations:
        op = op.operation
        found.append(op)
        for region in op.regions:
            for inner in region.blocks:
                found.extend(_ops(inner))
    return found


def _users_of(value: ir.Value) -> List[ir.Operation]:
    return [u.owner.operation if hasattr(u.owner, "operation") else u.owner for u in value.uses]


def _only_contracted(value: ir.Value) -> bool:
    """Whether `value` is used only as a contraction operand, directly or through shape_casts
    (a packed GQA query tile, read as groups x rows x E, is contracted as (groups * rows) x E)."""
    users = _users_of(value)
    return bool(users) and all(u.name == "vector.contract" or
                               (u.name == "vector.shape_cast" and _only_contracted(u.results[0]))
                               for u in users)


def staged_reads(block: ir.Block) -> Set[ir.Operation]:
    """transfer_reads whose value is only an operand of contractions (tensor-core operands)."""
    return {op for op in _ops(block) if op.name == "vector.transfer_read" and _only_contracted(op.results[0])}


class LayoutAnalysis:
    """Layouts of every vector value under one work-group body."""

    def __init__(self, body: ir.Block, rows: int):
        self.rows = rows
        self.layouts: Dict[ir.Value, Set[Layout]] = {}   # natural and demanded
        self.natural: Dict[ir.Value, Set[Layout]] = {}   # from anchors, forward only
        self.staged = staged_reads(body)
        self.ops = _ops(body)
        for _ in range(50):
            if not self._sweep():
                return
        raise CompileError("nvvm: layout assignment does not converge")

    @classmethod
    def from_annotations(cls, body: ir.Block, rows: int) -> "LayoutAnalysis":
        """The layouts `annotate_layouts` wrote on the ops under `body`; CompileError where an op
        with vector results carries none (the nvvm-layouts stage did not run on it)."""
        analysis = cls.__new__(cls)
        analysis.rows, analysis.layouts, analysis.natural = rows, {}, {}
        analysis.ops, analysis.staged = _ops(body), set()
        for op in analysis.ops:
            if not any(vector_shape(r) is not None for r in op.results):
                continue
            if LAYOUTS_ATTR not in op.attributes:
                raise CompileError(f"nvvm: {op.name} has no {LAYOUTS_ATTR} attribute (the nvvm-layouts stage "
                                   f"assigns the layouts of every vector value)")
            texts = [ir.StringAttr(a).value for a in ir.ArrayAttr(op.attributes[LAYOUTS_ATTR])]
            if len(texts) != len(op.results):
                raise CompileError(f"nvvm: {op.name} has {len(op.results)} results but {len(texts)} layouts")
            carried = list(op.opview.inner_iter_args) if op.name == "scf.for" else []
            for i, (result, text) in enumerate(zip(op.results, texts)):
                if text == STAGED:
                    analysis.staged.add(op)
                elif text not in (_UNIFORM, _NONE, _SCALAR):
                    layouts = {parse_layout(t) for t in text.split(" | ")}
                    analysis.layouts[result] = layouts
                    if carried:  # a loop's carried value has one layout in and out of it
                        analysis.layouts[carried[i]] = layouts
        return analysis

    def annotate(self) -> None:
        """Write the assigned layouts on the ops (LAYOUTS_ATTR)."""
        for op in self.ops:
            if any(vector_shape(r) is not None for r in op.results):
                op.attributes[LAYOUTS_ATTR] = ir.ArrayAttr.get(
                    [ir.StringAttr.get(self._text(op, r)) for r in op.results])

    def _text(self, op: ir.Operation, value: ir.Value) -> str:
        if vector_shape(value) is None:
            return _SCALAR
        if op in self.staged:
            return STAGED
        layouts = sorted(self.of(value), key=str)
        if not layouts:
            return _UNIFORM if is_uniform(value) else _NONE
        return " | ".join(layout.text() for layout in layouts)

    def of(self, value: ir.Value) -> Set[Layout]:
        return self.layouts.get(value, set())

    def natural_of(self, value: ir.Value) -> Set[Layout]:
        return self.natural.get(value, set())

    def _add(self, value: ir.Value, layout: Layout, natural: bool = False) -> bool:
        if vector_shape(value) is None or layout is None:
            return False
        if defining_op(value) is not None and defining_op(value) in self.staged:
            return False
        changed = False
        if natural:
            have = self.natural.setdefault(value, set())
            if layout not in have:
                have.add(layout)
                changed = True
        have = self.layouts.setdefault(value, set())
        if layout not in have:
            have.add(layout)
            changed = True
        return changed

    def _sweep(self) -> bool:
        changed = False
        for op in self.ops:
            changed |= self._forward(op)
        for op in reversed(self.ops):
            changed |= self._backward(op)
        return changed

    # ------------------------------------------------------------------ forward: anchors

    def _forward(self, op: ir.Operation) -> bool:
        name, changed = op.name, False
        if name == "vector.contract":
            changed |= self._add(op.results[0], layout_for_shape(vector_shape(op.results[0]), self.rows), natural=True)
        elif name == "vector.multi_reduction":
            changed |= self._add(op.results[0], layout_for_shape(vector_shape(op.results[0]), self.rows), natural=True)
        elif name.startswith(ELEMENTWISE_PREFIXES) and op.results and vector_shape(op.results[0]) is not None:
            for operand in op.operands:
                for layout in list(self.natural_of(operand)):
                    changed |= self._add(op.results[0], layout, natural=True)
        elif name == "vector.shape_cast":
            for layout in list(self.natural_of(op.operands[0])):
                changed |= self._add(op.results[0], shape_cast_layout(layout, vector_shape(op.operands[0]),
                                                                       vector_shape(op.results[0])), natural=True)
        elif name == "vector.broadcast" and vector_shape(op.operands[0]) is not None:
            if self.natural_of(op.operands[0]):
                changed |= self._add(op.results[0], layout_for_shape(vector_shape(op.results[0]), self.rows), natural=True)
        elif name == "scf.for":
            view = op.opview
            yields = list(view.body.operations)[-1].operation.operands
            for i, (arg, result) in enumerate(zip(view.inner_iter_args, op.results)):
                for layout in list(self.natural_of(yields[i])) + list(self.natural_of(view.initArgs[i])):
                    changed |= self._add(arg, layout, natural=True)
                    changed |= self._add(result, layout, natural=True)
        elif name == "scf.if":
            for region in op.regions:
                yields = list(region.blocks[0].operations)[-1].operation.operands
                for result, value in zip(op.results, yields):
                    for layout in list(self.natural_of(value)):
                        changed |= self._add(result, layout, natural=True)
        return changed

    # ------------------------------------------------------------------ backward: demands

    def _backward(self, op: ir.Operation) -> bool:
        name, changed = op.name, False
        if name.startswith(ELEMENTWISE_PREFIXES) and op.results and vector_shape(op.results[0]) is not None:
            for layout in list(self.of(op.results[0])):
                for operand in op.operands:
                    if vector_shape(operand) is not None and not is_uniform(operand):
                        changed |= self._add(operand, layout)
        elif name == "vector.broadcast" and vector_shape(op.operands[0]) is not None \
                and not is_uniform(op.operands[0]):
            for layout in list(self.of(op.results[0])):
                changed |= self._add(op.operands[0], broadcast_source_layout(
                    layout, vector_shape(op.results[0]), vector_shape(op.operands[0])))
        elif name == "vector.shape_cast":
            for layout in list(self.of(op.results[0])):
                changed |= self._add(op.operands[0], shape_cast_layout(layout, vector_shape(op.results[0]),
                                                                        vector_shape(op.operands[0])))
        elif name == "vector.multi_reduction":
            for layout in list(self.of(op.results[0])):
                changed |= self._add(op.operands[1], layout)
            changed |= self._add(op.operands[0], layout_for_shape(vector_shape(op.operands[0]), self.rows))
        elif name == "vector.contract":
            for layout in list(self.of(op.results[0])):
                changed |= self._add(op.operands[2], layout)
            lhs = op.operands[0]
            lhs_op = defining_op(lhs)
            if lhs_op is None or lhs_op not in self.staged:  # a register operand (P): a tile
                changed |= self._add(lhs, layout_for_shape(vector_shape(lhs), self.rows))
        elif name == "vector.transfer_write":
            value = op.operands[0]
            if not self.of(value):
                changed |= self._add(value, layout_for_shape(vector_shape(value), self.rows))
        elif name == "scf.yield":
            parent = op.parent
            if parent.name in ("scf.for", "scf.if"):
                for result, value in zip(parent.results, op.operands):
                    for layout in list(self.of(result)):
                        if not is_uniform(value):
                            changed |= self._add(value, layout)
        elif name == "scf.for":
            view = op.opview
            for arg, init, result in zip(view.inner_iter_args, view.initArgs, op.results):
                # A carried value has one layout in and out of the loop, also where nothing after
                # the loop uses the result (the running maximum of the split-key combine loop).
                for layout in list(self.of(arg)) + list(self.of(result)):
                    changed |= self._add(arg, layout)
                    changed |= self._add(result, layout)
                    if not is_uniform(init):
                        changed |= self._add(init, layout)
        return changed


def annotate_layouts(body: ir.Block, rows: int) -> None:
    """Assign the layouts of every vector value under a work-group body of `rows` rows and write
    them on its ops (stage nvvm-layouts)."""
    LayoutAnalysis(body, rows).annotate()
