"""CPU stage "cpu-grid": each top-level scf.forall becomes a grid function.

The CPU's counterpart of GPU kernel outlining.  A work-group (one forall
iteration) becomes one task; tasks are numbered row-major over the forall's
iteration space, and

    attention_grid<i>(index begin, index end, q, k, v, [mask], out, workspaces...)

runs tasks [begin, end).  The host launches the grids in order, each split
over the threads of torch's intra-op pool, so no MLIR runtime owns threads.
Buffers the function allocated (the materialized K^T) become *workspaces*:
arguments the host allocates.  Ops left at top level (canonicalization folds
a forall of a single iteration away) form a grid of one task.

Row tiles of a causal problem do unequal work (later rows see more keys), so
tasks walk the row tiles of a head in an interleaved order (0, n-1, 1, n-2, ...)
and any contiguous range of tasks mixes cheap and costly tiles.

The module gets an ``attn.kernel`` attribute recording grids and workspaces.
"""

from __future__ import annotations

import math
from typing import Dict, List

from mlir import ir
from mlir.dialects import arith, func, scf

from ...mlir_utils import (CompileError, const_index, defining_op, index, is_inside, op_of,
                           redirect_uses_inside, walk)
from ...payload import FUNC_NAME
from ...schedule.options import ScheduleOptions
from ...spec import AttentionSpec



def outline_grids(module: ir.Module, spec: AttentionSpec, options: ScheduleOptions) -> ir.Module:
    attention = _find_func(module, FUNC_NAME)
    body = attention.regions[0].blocks[0]
    args = list(body.arguments)
    top_level = [op.operation for op in body.operations]
    allocs = [op for op in top_level if op.name == "memref.alloc"]

    grids = []

    def add_grid(count, ops, forall=None):
        name = f"{FUNC_NAME}_grid{len(grids)}"
        _outline(module, attention, name, args, allocs, ops, forall, spec.causal)
        grids.append({"name": name, "tasks": count})

    # A work-group loop with a single iteration is folded away by canonicalization:
    # its ops then sit at top level and form a grid of one task, together with
    # every value op that depends on them (the rest are cloned where used).
    serial: List[ir.Operation] = []
    in_serial = set()
    for op in top_level:
        if op.name in ("memref.alloc", "func.return"):
            continue
        if _is_value_op(op) and not any(defining_op(v) in in_serial for v in op.operands):
            continue
        if op.name == "scf.forall":
            if serial:
                add_grid(1, serial)
                serial = []
            add_grid(_task_count(op), None, forall=op)
        else:
            serial.append(op)
            in_serial.add(op)
    if serial:
        add_grid(1, serial)
    if not grids:
        raise CompileError("cpu-grid: the kernel does no work")
    workspaces = [{"shape": list(ir.MemRefType(a.results[0].type).shape),
                   "dtype": str(ir.MemRefType(a.results[0].type).element_type)} for a in allocs]
    attention.erase()
    module.operation.attributes["attn.kernel"] = ir.DictAttr.get({
        "grids": ir.ArrayAttr.get([ir.DictAttr.get({
            "name": ir.StringAttr.get(g["name"]),
            "tasks": ir.IntegerAttr.get(ir.IntegerType.get_signless(64), g["tasks"])}) for g in grids]),
        "workspaces": ir.ArrayAttr.get([ir.DictAttr.get({
            "shape": ir.DenseI64ArrayAttr.get(w["shape"]),
            "dtype": ir.StringAttr.get(w["dtype"])}) for w in workspaces]),
    })
    return module


def kernel_metadata(module: ir.Module) -> Dict:
    """Read back the grids and workspaces recorded by `outline_grids`."""
    info = ir.DictAttr(module.operation.attributes["attn.kernel"])
    grids = [{"name": ir.StringAttr(ir.DictAttr(g)["name"]).value,
              "tasks": ir.IntegerAttr(ir.DictAttr(g)["tasks"]).value}
             for g in ir.ArrayAttr(info["grids"])]
    workspaces = [{"shape": list(ir.DenseI64ArrayAttr(ir.DictAttr(w)["shape"])),
                   "dtype": ir.StringAttr(ir.DictAttr(w)["dtype"]).value}
                  for w in ir.ArrayAttr(info["workspaces"])]
    return {"grids": grids, "workspaces": workspaces}


def _find_func(module: ir.Module, name: str):
    for op in module.body.operations:
        op = op.operation
        if op.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == name:
            return op
    raise CompileError(f"cpu-grid: no function @{name}")


def _static_bounds(forall):
    attrs = forall.attributes
    lower = list(ir.DenseI64ArrayAttr(attrs["staticLowerBound"]))
    upper = list(ir.DenseI64ArrayAttr(attrs["staticUpperBound"]))
    step = list(ir.DenseI64ArrayAttr(attrs["staticStep"]))
    dynamic = ir.ShapedType.get_dynamic_size()
    if dynamic in lower + upper + step:
        raise CompileError("cpu-grid: forall with dynamic bounds")
    return lower, upper, step


def _counts(lower, upper, step) -> List[int]:
    """Iterations of each forall dim."""
    return [-(-(u - lo) // st) for lo, u, st in zip(lower, upper, step)]


def _task_count(forall) -> int:
    return math.prod(_counts(*_static_bounds(forall)))


def _outline(module, attention, name, args, allocs, ops, forall, interleave_rows) -> None:
    """Move `ops` (or the body of `forall`) into a new grid function `name`."""
    arg_types = [index(), index()] + [a.type for a in args] + [a.results[0].type for a in allocs]
    with ir.InsertionPoint(attention):
        grid = func.FuncOp(name, (arg_types, []))
    grid.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
    entry = grid.add_entry_block()
    new_args = list(entry.arguments)
    with ir.InsertionPoint(entry):
        loop = scf.ForOp(new_args[0], new_args[1], const_index(1))
        with ir.InsertionPoint(loop.body):
            if forall is not None:
                lower, upper, step = _static_bounds(forall)
                ivs = _task_ivs(loop.induction_variable, _counts(lower, upper, step), lower, step, interleave_rows)
            terminator = scf.YieldOp([])
        func.ReturnOp([])

    if forall is not None:
        forall_body = forall.regions[0].blocks[0]
        ops = [o.operation for o in forall_body.operations if o.operation.name != "scf.forall.in_parallel"]
    for op in ops:
        op.move_before(terminator)
    _clone_outer_values(grid.operation, attention, loop.operation)
    if forall is not None:
        for old, new in zip(forall_body.arguments, ivs):
            redirect_uses_inside(old, new, grid.operation)
    for old, new in zip(args, new_args[2:2 + len(args)]):
        redirect_uses_inside(old, new, grid.operation)
    for alloc, new in zip(allocs, new_args[2 + len(args):]):
        redirect_uses_inside(alloc.results[0], new, grid.operation)
    for op in ops:
        for result in op.results:
            if any(not is_inside(op_of(use.owner), grid.operation) for use in result.uses):
                raise CompileError(f"cpu-grid: {op.name} is used outside its grid")


def _task_ivs(task, counts, lower, step, interleave_last):
    """Forall induction variables of task number `task` (row-major, last dim fastest)."""
    ivs = []
    rest = task
    for d in reversed(range(len(counts))):
        n = const_index(counts[d])
        i = arith.remui(rest, n) if d > 0 else rest
        rest = arith.divui(rest, n) if d > 0 else rest
        if interleave_last and d == len(counts) - 1 and counts[d] > 2:
            i = _interleave(i, counts[d])
        ivs.append(arith.addi(const_index(lower[d]), arith.muli(i, const_index(step[d]))))
    return list(reversed(ivs))


def _interleave(i, n):
    """0, n-1, 1, n-2, ...: pairs a cheap causal row tile with a costly one."""
    half = arith.divui(i, const_index(2))
    odd = arith.cmpi(arith.CmpIPredicate.ne, arith.remui(i, const_index(2)), const_index(0))
    return arith.select(odd, arith.subi(const_index(n - 1), half), half)


#: top-level ops that change memory: they run in a grid of their own, never cloned.
_WRITES = ("vector.transfer_write", "vector.store", "memref.store", "memref.copy", "vector.maskedstore")


def _is_value_op(op: ir.Operation) -> bool:
    """A top-level op that only computes or reads a value (constants; reads of inputs hoisted
    out of a folded work-group loop).  Grids that use it get their own copy."""
    return (len(op.results) > 0 and not op.regions and op.name not in _WRITES
            and op.name != "memref.alloc")


def _clone_outer_values(grid, attention, anchor) -> None:
    """Value ops of the old function used in the grid: clone them (operands first) before `anchor`."""
    clones = {}

    def local(value):
        producer = defining_op(value)
        if (producer is None or producer.name == "memref.alloc" or not is_inside(producer, attention)
                or is_inside(producer, grid)):
            return value  # block arguments and workspaces are remapped by the caller
        if not _is_value_op(producer):
            raise CompileError(f"cpu-grid: work-group uses {producer.name} defined outside it")
        if producer not in clones:
            operands = [local(operand) for operand in producer.operands]
            copy = producer.clone(ip=ir.InsertionPoint(anchor))
            for i, operand in enumerate(operands):
                copy.operands[i] = operand
            clones[producer] = copy.operation
        return clones[producer].results[list(producer.results).index(value)]

    users = walk(grid, lambda op: True)
    for op in users:
        for i, operand in enumerate(op.operands):
            replacement = local(operand)
            if replacement != operand:
                op.operands[i] = replacement
