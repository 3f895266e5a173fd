"""CPU stage "cpu-grid": each top-level scf.forall becomes a grid function.

The CPU's counterpart of GPU kernel outlining.  A work-group (one forall
iteration) becomes one task; tasks are numbered row-major over the forall's
iteration space (last dim fastest), and

    attention_grid<i>(index begin, index end, q, k, v, [mask], out, workspaces...)

runs tasks [begin, end).  The loops' bounds are run-time values (they follow
the lengths), so the kernel also exports

    attention_plan(q, k, v, [mask], out, memref<N x i64> plan)

which writes, for the sizes of these operands, the task count of every grid
followed by the dynamic sizes of every workspace.  The host calls the plan,
allocates the workspaces (buffers the function allocated: the materialized
K^T, the partials of split keys), then launches the grids in order, each split
over the threads of torch's intra-op pool, so no MLIR runtime owns threads.

Row tiles of a causal problem do unequal work (later rows see more keys), so
tasks of the work-group loop walk the row tiles of a head in an interleaved
order (0, n-1, 1, n-2, ...) and any contiguous range of tasks mixes cheap and
costly tiles.

The module gets an ``attn.kernel`` attribute recording grids, workspaces and
the plan's length.
"""

from __future__ import annotations

from typing import Dict, List

from mlir import ir
from mlir.dialects import arith, func, memref, scf

from ...mlir_utils import (CompileError, const_index, defining_op, index, is_inside, op_of,
                           redirect_uses_inside, walk)
from ...payload import FUNC_NAME
from ...schedule.bufferize import host_function, is_value_op
from ...schedule.tiling import WORK_GROUPS, forall_upper_bounds
from ...spec import AttentionSpec

PLAN_NAME = f"{FUNC_NAME}_plan"


def outline_grids(module: ir.Module, spec: AttentionSpec, options) -> ir.Module:
    attention, args, allocs, loops = host_function(module, "cpu-grid")

    grids = []
    for loop in loops:
        name = f"{FUNC_NAME}_grid{len(grids)}"
        interleave = spec.causal and WORK_GROUPS in loop.attributes
        _outline(attention, name, args, allocs, loop, interleave)
        grids.append(name)
    plan_length = _build_plan(attention, args, loops, allocs)
    workspaces = [{"shape": list(ir.MemRefType(a.results[0].type).shape),
                   "dtype": str(ir.MemRefType(a.results[0].type).element_type)} for a in allocs]
    attention.erase()
    module.operation.attributes["attn.kernel"] = ir.DictAttr.get({
        "grids": ir.ArrayAttr.get([ir.StringAttr.get(g) for g in grids]),
        "workspaces": ir.ArrayAttr.get([ir.DictAttr.get({
            "shape": ir.DenseI64ArrayAttr.get(w["shape"]),
            "dtype": ir.StringAttr.get(w["dtype"])}) for w in workspaces]),
        "plan": ir.StringAttr.get(PLAN_NAME),
        "plan_length": ir.IntegerAttr.get(ir.IntegerType.get_signless(64), plan_length),
    })
    return module


def kernel_metadata(module: ir.Module) -> Dict:
    """Read back the grids, workspaces and plan recorded by `outline_grids`.

    A workspace dim of -1 is dynamic: its size comes from the plan.
    """
    info = ir.DictAttr(module.operation.attributes["attn.kernel"])
    grids = [ir.StringAttr(g).value for g in ir.ArrayAttr(info["grids"])]
    dynamic = ir.ShapedType.get_dynamic_size()
    workspaces = [{"shape": [-1 if d == dynamic else d for d in ir.DenseI64ArrayAttr(ir.DictAttr(w)["shape"])],
                   "dtype": ir.StringAttr(ir.DictAttr(w)["dtype"]).value}
                  for w in ir.ArrayAttr(info["workspaces"])]
    return {"grids": grids, "workspaces": workspaces, "plan": ir.StringAttr(info["plan"]).value,
            "plan_length": ir.IntegerAttr(info["plan_length"]).value}


def _bound_values(loop) -> List[ir.Value]:
    """The forall's upper bounds as index values (of the old function; cloned where used)."""
    return [const_index(b) if isinstance(b, int) else b for b in forall_upper_bounds(loop)]


def _check_normalized(loop) -> None:
    attrs = loop.attributes
    if (any(v != 0 for v in ir.DenseI64ArrayAttr(attrs["staticLowerBound"]))
            or any(v != 1 for v in ir.DenseI64ArrayAttr(attrs["staticStep"]))):
        raise CompileError("cpu-grid: the work-group loop is not normalized")


def _new_function(attention, name: str, arg_types) -> func.FuncOp:
    with ir.InsertionPoint(attention), attention.location:
        fn = func.FuncOp(name, (arg_types, []))
    fn.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
    fn.add_entry_block()
    return fn


def _outline(attention, name, args, allocs, loop, interleave_last) -> None:
    """Move the body of `loop` into a new grid function `name`."""
    _check_normalized(loop)
    arg_types = [index(), index()] + [a.type for a in args] + [a.results[0].type for a in allocs]
    grid = _new_function(attention, name, arg_types)
    entry = grid.regions[0].blocks[0]
    new_args = list(entry.arguments)
    with ir.InsertionPoint(entry), attention.location:
        tasks = scf.ForOp(new_args[0], new_args[1], const_index(1))
        with ir.InsertionPoint(tasks.body):
            ivs = _task_ivs(tasks.induction_variable, _bound_values(loop), interleave_last)
            terminator = scf.YieldOp([])
        func.ReturnOp([])
    loop_body = loop.regions[0].blocks[0]
    ops = [o.operation for o in loop_body.operations if o.operation.name != "scf.forall.in_parallel"]
    for op in ops:
        op.move_before(terminator)
    _clone_outer_values(grid.operation, attention, tasks.operation)
    for old, new in zip(loop_body.arguments, ivs):
        redirect_uses_inside(old, new, grid.operation)
    _redirect_arguments(grid.operation, args, allocs, new_args[2:])
    for op in ops:
        for result in op.results:
            if any(not is_inside(op_of(use.owner), grid.operation) for use in result.uses):
                raise CompileError(f"cpu-grid: {op.name} is used outside its grid")


def _redirect_arguments(fn, args, allocs, new_args) -> None:
    for old, new in zip(args, new_args):
        redirect_uses_inside(old, new, fn)
    for alloc, new in zip(allocs, new_args[len(args):]):
        redirect_uses_inside(alloc.results[0], new, fn)


def _build_plan(attention, args, loops, allocs) -> int:
    """attention_plan(args..., memref<N x i64>): task counts of the grids, then the dynamic
    workspace sizes, for the run-time sizes of the arguments."""
    entries = []
    dynamic_sizes = [list(a.operands) for a in allocs]
    length = len(loops) + sum(len(d) for d in dynamic_sizes)
    i64 = ir.IntegerType.get_signless(64)
    plan = _new_function(attention, PLAN_NAME, [a.type for a in args] + [ir.MemRefType.get([length], i64)])
    entry = plan.regions[0].blocks[0]
    new_args = list(entry.arguments)
    with ir.InsertionPoint(entry), attention.location:
        for loop in loops:
            count = None
            for bound in _bound_values(loop):
                count = bound if count is None else arith.muli(count, bound)
            entries.append(count)
        for sizes in dynamic_sizes:
            entries.extend(sizes)
        anchor = func.ReturnOp([])
    with ir.InsertionPoint(anchor), attention.location:
        for i, value in enumerate(entries):
            memref.store(arith.index_cast(i64, value), new_args[-1], [const_index(i)])
    _clone_outer_values(plan.operation, attention, entry.operations[0].operation)
    _redirect_arguments(plan.operation, args, [], new_args[:-1])
    return length


def _task_ivs(task, counts, interleave_last):
    """Forall induction variables of task number `task` (row-major, last dim fastest)."""
    ivs = []
    rest = task
    for d in reversed(range(len(counts))):
        n = counts[d]
        i = arith.remui(rest, n) if d > 0 else rest
        rest = arith.divui(rest, n) if d > 0 else rest
        if interleave_last and d == len(counts) - 1:
            i = _interleave(i, n)
        ivs.append(i)
    return list(reversed(ivs))


def _interleave(i, n):
    """0, n-1, 1, n-2, ...: pairs a cheap causal row tile with a costly one."""
    half = arith.divui(i, const_index(2))
    odd = arith.cmpi(arith.CmpIPredicate.ne, arith.remui(i, const_index(2)), const_index(0))
    return arith.select(odd, arith.subi(arith.subi(n, const_index(1)), half), half)


#: top-level ops that change memory: never cloned.
def _clone_outer_values(grid, attention, anchor) -> None:
    """Value ops of the old function used in the grid: clone them (operands first) before `anchor`."""
    clones = {}

    def local(value):
        producer = defining_op(value)
        if (producer is None or producer.name == "memref.alloc" or not is_inside(producer, attention)
                or is_inside(producer, grid)):
            return value  # block arguments and workspaces are remapped by the caller
        if not is_value_op(producer):
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
