"""Shared stage "tiled": decompose softmax, tile and fuse the parallel dims into the work-group loop.

After this stage the function holds one work-group loop, the contract every
target builds on:

    scf.forall (%b, %h, %g, %p, %r) in (B, H, G | 1, P, ceil(L / row_tile))
        {mapping = [#gpu.block<linear_dim_4>, ..., #gpu.block<linear_dim_0>], attn.work_groups}

    b  batch               h  key/value head
    g  query head of the group (extent 1 when ScheduleOptions.pack_gqa: the
       work-group then holds all G heads)
    p  key split (extent ScheduleOptions.kv_splits, or chosen at run time from the
       sizes with split_fill; 1 without splitting)
    r  row tile (row_tile rows of L; the row tile is linear_dim_0, the fastest)

It is normalized (lower bounds 0, steps 1) and carries its mapping from the
moment it is created, so canonicalization never folds its unit dims: it has
five dims for every spec, also when the problem is one work-group.  Bounds
follow the run-time sizes.  Each iteration holds the whole unfused chain for
its rows (QK^T, scale, mask/causal, the four softmax generics, P.V) on
tensors of shape (1, 1, 1 | G, rows, S) with rows = min(row_tile, L - r0);
the flash stage replaces the S-long part by the online-softmax loop over
full tiles.
"""

from __future__ import annotations

from typing import List, Sequence, Union

from mlir import ir
from mlir.dialects import arith, memref, scf
from mlir.dialects.transform import structured

from ..mlir_utils import TransformScript, any_op, cleanup, const_index, match_attr, match_ops, match_tag, walk
from ..spec import AttentionSpec
from .options import ScheduleOptions

#: the dims of the work-group loop, in order.
WORK_GROUP_DIMS = ("b", "h", "g", "p", "r")
#: unit attribute that marks the work-group loop.
WORK_GROUPS = "attn.work_groups"
#: integer attribute of a work-group loop whose tiles' rows are not the spec's row tile: the
#: leading extent of the tiles it accumulates and writes (a backward's dK/dV loop: its keys).
WORK_GROUP_ROWS = "attn.rows"
_PRODUCER = "attn.producer"


def block_mapping(rank: int) -> ir.ArrayAttr:
    """#gpu.block<linear_dim_{rank-1}> ... <linear_dim_0>: the last dim is the fastest."""
    return ir.ArrayAttr.get([ir.Attribute.parse(f"#gpu.block<linear_dim_{rank - 1 - i}>")
                             for i in range(rank)])


def tile_and_fuse(module: ir.Module, spec: AttentionSpec, options: ScheduleOptions) -> ir.Module:
    """Run the tiling schedule on `module` in place and return it.

    A backward payload is checked and left as it is: its work-groups are cut by the flash stage
    (schedule/flash_backward.py), since its two loops tile different dims of one recomputed
    probability tile (query rows for dQ, keys for dK and dV) and fusion into one loop would
    compute that tile once per loop from scratch anyway."""
    if spec.kernel == "backward":
        from .flash_backward import check_backward_payload
        check_backward_payload(module)
        return module
    _decompose_softmax(module)
    producers = _mark_producers(module)
    with TransformScript() as script:
        root = script.root
        # Tile (b, h, g, l) of the result; the mapping is set here, at creation.
        group_tile = spec.group if options.pack_gqa else 1
        structured.TileUsingForallOp(match_attr(root, "attn.root"), tile_sizes=[1, 1, group_tile, options.row_tile],
                                     mapping=block_mapping(4))
    script.apply(module)
    cleanup(module)  # sizes of the loop now read the inputs, not the unfused ops
    # Consumers first, so that every use of a producer is inside when it is fused.  Fusion
    # tiles a producer once per use; CSE after each step merges the copies (without it
    # they multiply from step to step).
    for i in reversed(range(producers)):
        with TransformScript() as script:
            root = script.root
            structured.FuseIntoContainingOp(match_attr(root, _PRODUCER, str(i)), match_ops(root, ["scf.forall"]))
        script.apply(module)
        cleanup(module)
    for op in walk(module, lambda o: _PRODUCER in o.attributes):
        del op.attributes[_PRODUCER]
    loops = walk(module, lambda o: o.name == "scf.forall")
    if len(loops) != 1:
        raise RuntimeError(f"tiled: expected one work-group loop, found {len(loops)}")
    _add_split_dim(loops[0], options)
    cleanup(module)
    return module


def _decompose_softmax(module: ir.Module) -> None:
    with TransformScript() as script:
        structured.DecomposeInterfaceOp(any_op(), match_tag(script.root, "softmax"))
    script.apply(module)


def _mark_producers(module: ir.Module) -> int:
    """Number the linalg ops of the function that the result depends on (all but the result) for
    one-by-one fusion.  Ops the result does not depend on (a forward_lse kernel's log-sum-exp
    chain) stay outside: the flash stage replaces them."""
    roots = walk(module, lambda o: "attn.root" in o.attributes)
    needed = set()
    stack = [operand for root in roots for operand in root.operands]
    while stack:
        owner = stack.pop().owner
        if isinstance(owner, ir.Block):
            continue
        op = owner.operation
        if op not in needed:
            needed.add(op)
            stack.extend(op.operands)
    ops = walk(module, lambda o: o.name.startswith("linalg.") and o.parent.name == "func.func"
               and "attn.root" not in o.attributes and o in needed)
    for i, op in enumerate(ops):
        op.attributes[_PRODUCER] = ir.StringAttr.get(str(i))
    return len(ops)


def forall_upper_bounds(forall: ir.Operation) -> List[Union[int, ir.Value]]:
    """Upper bounds of an scf.forall, static ones as ints."""
    static = list(ir.DenseI64ArrayAttr(forall.attributes["staticUpperBound"]))
    dynamic = iter(forall.opview.dynamicUpperBound)
    return [next(dynamic) if s == ir.ShapedType.get_dynamic_size() else s for s in static]


def rebuild_forall(old: ir.Operation, upper_bounds: Sequence, iv_map: Sequence[int],
                   shared_outs: Sequence[ir.Value], mapping: ir.ArrayAttr) -> scf.ForallOp:
    """A new normalized scf.forall in place of `old`, with `old`'s body moved into it.

    iv_map[i] is the position in the new loop of `old`'s i-th induction
    variable.  The new loop's shared outs replace `old`'s one for one; `old`'s
    results are replaced by the new loop's and `old` is erased.
    """
    old_view = old.opview
    with ir.InsertionPoint(old), old.location:
        new = scf.ForallOp([0] * len(upper_bounds), list(upper_bounds), [1] * len(upper_bounds),
                           list(shared_outs), mapping=mapping)
    for name in old.attributes:
        attr = old.attributes[name]
        if name.startswith("attn."):
            new.attributes[name] = attr
    old_body = old_view.body
    for op in list(old_body.operations):
        new.body.append(op.operation)  # moves it
    for i, iv in enumerate(old_view.induction_variables):
        iv.replace_all_uses_with(new.induction_variables[iv_map[i]])
    for old_arg, new_arg in zip(old_view.inner_iter_args, new.inner_iter_args):
        old_arg.replace_all_uses_with(new_arg)
    for old_result, new_result in zip(old.results, new.results):
        old_result.replace_all_uses_with(new_result)
    old.erase()
    return new


def _add_split_dim(loop: ir.Operation, options: ScheduleOptions) -> scf.ForallOp:
    """(b, h, g, r) -> (b, h, g, p, r): the key-split dim, fixed in place for every spec."""
    b, h, g, r = forall_upper_bounds(loop)
    splits = options.kv_splits
    if splits > 1 and options.split_fill:
        with ir.InsertionPoint(loop), loop.location:
            splits = _run_time_splits(loop, [b, h, g, r], options)
    new = rebuild_forall(loop, [b, h, g, splits, r], [0, 1, 2, 4],
                         list(loop.opview.outputs), block_mapping(len(WORK_GROUP_DIMS)))
    new.attributes[WORK_GROUPS] = ir.UnitAttr.get()
    return new


def _run_time_splits(loop: ir.Operation, bounds, options: ScheduleOptions) -> ir.Value:
    """P = max(1, min(kv_splits, ceil(split_fill / work-groups), ceil(S / split_min_keys))),
    from the sizes of the function's arguments (K, its second, is B x H x S x E)."""
    func = loop.parent
    while func.name != "func.func":
        func = func.parent
    key = func.regions[0].blocks[0].arguments[1]
    groups = None
    for bound in bounds:
        value = const_index(bound) if isinstance(bound, int) else bound
        groups = value if groups is None else arith.muli(groups, value)
    by_fill = arith.ceildivui(const_index(options.split_fill), groups)
    by_length = arith.ceildivui(memref.dim(key, const_index(2)), const_index(options.split_min_keys))
    splits = arith.minui(const_index(options.kv_splits), arith.minui(by_fill, by_length))
    return arith.maxui(splits, const_index(1))
