"""Structural facts of the shared work-group IR, read by walking it (for the schedule tests).

`describe(ir_text)` parses a stage's IR and reports what a GPU target relies
on: the work-group loop (rank, bounds normalized, mapping), the flash loops
and what they carry, every contraction's shapes, where Q is read, and where
the allocations are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

from mlir import ir

from torch_xegpu_attn.mlir_utils import is_inside, mlir_context, walk


@dataclass
class WorkGroupIR:
    loops: List[dict] = field(default_factory=list)          # every scf.forall: attrs, rank, normalized, mapping
    flash_loops: List[List[str]] = field(default_factory=list)  # iter_arg types of each flash scf.for
    contractions: List[Tuple[Tuple[int, ...], ...]] = field(default_factory=list)  # (lhs, rhs, acc) shapes
    q_reads_outside_loops: int = 0                            # transfer_reads of Q outside any scf.for
    q_reads_inside_loops: int = 0
    allocations_in_loops: int = 0
    transposes_in_flash_loops: int = 0
    carried_by_loops: List[dict] = field(default_factory=list)  # per scf.forall: its attrs and the
    #                                                             vector types its scf.fors carry


def _shape(value: ir.Value) -> Tuple[int, ...]:
    t = value.type
    return tuple(ir.VectorType(t).shape) if isinstance(t, ir.VectorType) else ()


def _base_argument(value: ir.Value):
    """The function argument a memref (or tensor) value views, through subviews/slices/to_tensor."""
    while not isinstance(value.owner, ir.Block):
        op = value.owner.operation
        if op.name not in ("memref.subview", "tensor.extract_slice", "bufferization.to_tensor"):
            return None
        value = op.operands[0]
    return value


def describe(ir_text: str) -> WorkGroupIR:
    report = WorkGroupIR()
    with mlir_context():
        module = ir.Module.parse(ir_text)
        funcs = [op.operation for op in module.body.operations if op.operation.name == "func.func"]
        q_arg = funcs[0].regions[0].blocks[0].arguments[0]
        foralls = walk(module, lambda op: op.name == "scf.forall")
        for loop in foralls:
            attrs = loop.attributes
            report.loops.append({
                "attrs": sorted(a for a in attrs if a.startswith("attn.")),
                "rank": len(ir.DenseI64ArrayAttr(attrs["staticUpperBound"])),
                "normalized": (all(v == 0 for v in ir.DenseI64ArrayAttr(attrs["staticLowerBound"]))
                               and all(v == 1 for v in ir.DenseI64ArrayAttr(attrs["staticStep"]))),
                "mapping": [str(m) for m in ir.ArrayAttr(attrs["mapping"])] if "mapping" in attrs else None,
            })
        fors = walk(module, lambda op: op.name == "scf.for")
        for loop in walk(module, lambda op: op.name == "scf.for" and "attn.flash_loop" in op.attributes):
            report.flash_loops.append([str(v.type) for v in loop.results])
            report.transposes_in_flash_loops += len(walk(loop, lambda op: op.name == "vector.transpose"))
        for op in walk(module, lambda op: op.name == "vector.contract"):
            report.contractions.append(tuple(_shape(v) for v in op.operands[:3]))
        for op in walk(module, lambda op: op.name == "vector.transfer_read"):
            base = _base_argument(op.operands[0])
            if base is not None and base == q_arg:
                if any(is_inside(op, loop) for loop in fors):
                    report.q_reads_inside_loops += 1
                else:
                    report.q_reads_outside_loops += 1
        for loop in foralls:
            carried = sorted({str(v.type) for inner in walk(loop, lambda op: op.name == "scf.for")
                              for v in inner.results if isinstance(v.type, ir.VectorType)})
            report.carried_by_loops.append({"attrs": sorted(a for a in loop.attributes if a.startswith("attn.")),
                                            "carried": carried})
        report.allocations_in_loops = len(walk(module, lambda op: op.name in ("memref.alloc", "memref.alloca")
                                               and any(is_inside(op, loop) for loop in foralls)))
    return report
