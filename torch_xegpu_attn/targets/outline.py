"""Outlining shared by the GPU targets: each work-group loop of the shared IR becomes a gpu.func.

    scf.forall (ivs) in (bounds)   ->   gpu.func @attention_k<i>(args..., workspaces...) kernel
                                          ivs = delinearize(blockIdx.x, bounds), last dim fastest

What the kernel's body becomes is the target's choice (`emit_body`): nvvm
distributes every op to warps and lanes itself, xegpu moves the work-group body
in unchanged and lets XeGPU's pipeline distribute it by layout.  Values of the
old function that the loop uses (sizes of the arguments, loop bounds) are
cloned into the kernel; buffers the function allocated (workspaces) become
kernel arguments.  The host needs the grid of each kernel and the size of each
workspace as functions of the arguments' sizes: they are recorded as small
expression trees over `dim(argument, d)` (`size_expression`).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Union

from mlir import ir
from mlir.dialects import arith, gpu

from ..mlir_utils import CompileError, const_index, defining_op, fold_affine, is_inside, walk
from ..payload import FUNC_NAME
from ..schedule.bufferize import host_function
from ..schedule.tiling import WORK_GROUPS, forall_upper_bounds

KERNEL_MODULE = "attention_kernels"

#: emit_body(loop, outer, insertion_point, ivs) -> extra metadata of the kernel (a dict).
BodyEmitter = Callable[[ir.Operation, "HostValues", ir.InsertionPoint, List[ir.Value]], Dict]


def size_expression(value, args: Sequence[ir.Value]):
    """An index value of the host function as a tree over the arguments' sizes:
    ["dim", arg, d] | ["const", n] | [op, a, b] with op in add, sub, mul, ceildiv, div, min, max."""
    if isinstance(value, int):
        return ["const", value]
    op = defining_op(value)
    if op is None:
        raise CompileError("outline: a loop bound is a block argument")
    name = op.name
    if name == "arith.constant":
        return ["const", ir.IntegerAttr(op.attributes["value"]).value]
    if name == "memref.dim":
        position = list(args).index(op.operands[0]) if op.operands[0] in list(args) else None
        if position is None:
            raise CompileError("outline: a size of something other than an argument")
        return ["dim", position, size_expression(op.operands[1], args)[1]]
    binary = {"arith.addi": "add", "arith.subi": "sub", "arith.muli": "mul", "arith.ceildivui": "ceildiv",
              "arith.ceildivsi": "ceildiv", "arith.divui": "div", "arith.minui": "min", "arith.maxui": "max"}
    if name in binary:
        return [binary[name], size_expression(op.operands[0], args), size_expression(op.operands[1], args)]
    if name == "affine.apply":
        amap = ir.AffineMapAttr(op.attributes["map"]).value
        operands = [size_expression(v, args) for v in op.operands]
        return _affine(amap.results[0], operands[:amap.n_dims], operands[amap.n_dims:])
    raise CompileError(f"outline: cannot express {name} as a size for the host")


def _affine(expr, dims, symbols):
    return fold_affine(expr, dims, symbols, lambda value: ["const", value],
                       lambda kind, a, b: [kind, a, b] if kind != "mod" else None, "outline: a size for the host")


def evaluate(expression, sizes: Sequence[Sequence[int]]) -> int:
    """Value of a size expression for the given argument shapes."""
    kind = expression[0]
    if kind == "const":
        return expression[1]
    if kind == "dim":
        return sizes[expression[1]][expression[2]]
    a, b = evaluate(expression[1], sizes), evaluate(expression[2], sizes)
    return {"add": a + b, "sub": a - b, "mul": a * b, "ceildiv": -(-a // b), "div": a // b,
            "min": min(a, b), "max": max(a, b)}[kind]


class HostValues:
    """Clones values of the host function into a kernel (memoized); arguments map to kernel args."""

    def __init__(self, host, mapping: Dict[ir.Value, ir.Value], ip: ir.InsertionPoint):
        self.host = host
        self.mapping = dict(mapping)
        self.ip = ip

    def __call__(self, value: ir.Value) -> ir.Value:
        if value in self.mapping:
            return self.mapping[value]
        op = defining_op(value)
        if op is None or op.regions or op.name in ("memref.alloc", "scf.forall"):
            raise CompileError(f"outline: the work-group uses {op.name if op else 'an argument'} from outside")
        operands = [self(v) for v in op.operands]
        with self.ip:
            copy = op.clone()
        for i, operand in enumerate(operands):
            copy.operands[i] = operand
        for old, new in zip(op.results, copy.results):
            self.mapping[old] = new
        return self.mapping[value]


def outline_work_groups(module: ir.Module, where: str, threads: Union[int, Callable[[ir.Operation], int]],
                        emit_body: BodyEmitter, causal: bool, head_chunk: int = 0) -> Dict:
    """Replace the host function by a gpu.module of one kernel per work-group loop, its body made
    by `emit_body`, of `threads` threads (or `threads(loop)` for each); return the launch metadata
    (kernel names, grids, threads, workspaces, and what emit_body adds per kernel)."""
    host, args, allocs, loops = host_function(module, where)
    module.operation.attributes["gpu.container_module"] = ir.UnitAttr.get()
    with ir.InsertionPoint(module.body), host.location:
        kernels_module = gpu.GPUModuleOp(KERNEL_MODULE)
        kernels_module.bodyRegion.blocks.append()
    kernels = []
    for number, loop in enumerate(loops):
        name = f"{FUNC_NAME}_k{number}"
        block = threads(loop) if callable(threads) else threads
        arg_types = [a.type for a in args] + [a.results[0].type for a in allocs]
        with ir.InsertionPoint(kernels_module.bodyRegion.blocks[0]), host.location:
            kernel = gpu.GPUFuncOp(ir.FunctionType.get(arg_types, []), sym_name=name, kernel=True,
                                   known_block_size=[block, 1, 1])
            entry = kernel.add_entry_block()
        kernel_args = list(entry.arguments)
        mapping = dict(zip(args, kernel_args[:len(args)]))
        mapping.update({a.results[0]: v for a, v in zip(allocs, kernel_args[len(args):])})
        with ir.InsertionPoint(entry), host.location:
            anchor = const_index(0)  # values cloned from the host function go before it, in order
            outer = HostValues(host, mapping, ir.InsertionPoint(defining_op(anchor)))
            bounds = [const_index(b) if isinstance(b, int) else outer(b) for b in forall_upper_bounds(loop)]
            reverse_rows = causal and WORK_GROUPS in loop.attributes
            ivs = delinearize(gpu.block_id(gpu.Dimension.x), bounds, reverse_rows, head_chunk)
            extra = emit_body(loop, outer, ir.InsertionPoint(defining_op(anchor)), ivs)
            gpu.ReturnOp([])
        grid = None
        for b in forall_upper_bounds(loop):
            e = size_expression(b, args)
            grid = e if grid is None else ["mul", grid, e]
        kernels.append({"name": name, "grid": grid, "threads": block, **extra})
    workspaces = []
    for alloc in allocs:
        mt = ir.MemRefType(alloc.results[0].type)
        dynamic = iter(alloc.operands)
        dims = [size_expression(next(dynamic), args) if d == ir.ShapedType.get_dynamic_size() else ["const", d]
                for d in mt.shape]
        workspaces.append({"dims": dims, "dtype": str(mt.element_type)})
    host.erase()
    return {"kernels": kernels, "workspaces": workspaces, "module": KERNEL_MODULE}


def move_body_into(loop: ir.Operation, outer: HostValues, ivs: List[ir.Value]) -> None:
    """The work-group body as it is, moved to the end of the kernel's entry block (where the
    ivs were computed): the loop's induction variables become `ivs`, and every value of the host
    function it uses becomes the kernel's copy."""
    body = loop.regions[0].blocks[0]
    for iv, new in zip(body.arguments, ivs):
        iv.replace_all_uses_with(new)
    moved = [op.operation for op in body.operations if op.operation.name != "scf.forall.in_parallel"]
    block = ir.InsertionPoint.current.block
    last = list(block.operations)[-1].operation
    kernel = block.owner
    kernel = getattr(kernel, "operation", kernel)
    for op in moved:
        op.move_after(last)
        last = op
    for op in moved:
        for user in walk(op, lambda o: True):
            for i, value in enumerate(user.operands):
                producer = defining_op(value)
                if producer is not None and not is_inside(producer, kernel):
                    user.operands[i] = outer(value)
                elif producer is None and value in outer.mapping:
                    user.operands[i] = outer.mapping[value]


def delinearize(linear: ir.Value, bounds: List[ir.Value], reverse_last: bool, head_chunk: int = 0) -> List[ir.Value]:
    """Induction variables of block `linear`, row-major (last dim fastest).  With reverse_last the
    last dim runs backwards: causal row tiles, the costliest first.  With a head_chunk C > 0 as
    well, blocks go in chunks of C "heads" (the leading dims together): within a chunk all its
    heads' costliest row tiles first, then the next ones (the last blocks of the grid are the
    cheapest, where reverse_last alone ends on a costly tile of the last head; a chunk's K and V
    are what the blocks running at once share in the L2 cache)."""
    if reverse_last and head_chunk > 0 and len(bounds) > 1:
        rows = bounds[-1]
        heads = bounds[0]
        for b in bounds[1:-1]:
            heads = arith.muli(heads, b)
        span = arith.muli(const_index(head_chunk), rows)
        chunk = arith.divui(linear, span)
        first = arith.muli(chunk, const_index(head_chunk))
        width = arith.minui(const_index(head_chunk), arith.subi(heads, first))  # the last chunk: fewer
        within = arith.subi(linear, arith.muli(chunk, span))
        row = arith.subi(arith.subi(rows, const_index(1)), arith.divui(within, width))
        head = arith.addi(first, arith.remui(within, width))
        return delinearize(head, bounds[:-1], False) + [row]
    ivs = []
    rest = linear
    for d in reversed(range(len(bounds))):
        i = arith.remui(rest, bounds[d]) if d > 0 else rest
        rest = arith.divui(rest, bounds[d]) if d > 0 else rest
        if reverse_last and d == len(bounds) - 1:
            i = arith.subi(arith.subi(bounds[d], const_index(1)), i)
        ivs.append(i)
    return list(reversed(ivs))
