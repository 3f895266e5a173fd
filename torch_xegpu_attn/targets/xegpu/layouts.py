"""xegpu stage "xegpu-wg": the work-group kernel in XeGPU ops, with layouts on its anchor ops.

Runs in the upstream MLIR of torch-mlir (the work-group XeGPU pipeline lives
there).  `convert-vector-to-xegpu` turns the transfers into 2D tensor
descriptors whose shape is the operand's run-time shape (reads past it give 0,
stores past it are dropped: tails cost nothing) and both contractions into
xegpu.dpas; then each anchor op gets a layout in XeGPU's terms, and
`xegpu-propagate-layout` gives every other op the layout its anchors imply.

How a work-group is cut (Geometry): R rows (the schedule's row tile) over
R / 16 sub-groups of 16 lanes, 16 rows each; every sub-group reads the whole
K and V tiles of a step.

    op                   sg_layout   sg_data            inst_data
    Q load, Q operand    [R/16, 1]   [16, E]            [16, 32]  (loads only)
    K load               [1, 1]      [kv, E]            (order [0, 1]: read column-major, so the
                                                         transpose before the dpas is free)
    K^T operand          [1, 1]      [E, kv]
    S = Q K^T, P         [R/16, 1]   [16, kv]
    V load, V operand    [1, 1]      [kv, Ev]           [32, 32]  (loads only)
    O, the store         [R/16, 1]   [16, Ev]
    K/V prefetches       [4, 2]      [kv/4, E/2 or Ev/2] [kv/4, min(E/2 or Ev/2, 32)] (sub-groups share the
                                                         prefetch; a message is at most 32 wide); with
                                                         fewer than 8 sub-groups [n, 1], [kv/n, E]

Ops are found by their role in the data flow (the dpas whose B operand is a
transpose is Q K^T), tagged with `attn.xegpu_role`, and the transform script
matches the tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from ...errors import CompileError

SG_ROWS = 16
#: work-items per sub-group (the kernels require this sub-group size).
LANES = 16
ROLE = "attn.xegpu_role"


@dataclass(frozen=True)
class Geometry:
    rows: int       # query rows of one work-group
    kv_tile: int
    head_dim: int
    v_head_dim: int
    prefetch: int = 1
    sg_rows: int = SG_ROWS   # query rows per sub-group (8 or 16: DPAS takes 8 rows at a time)

    @property
    def subgroups(self) -> int:
        return self.rows // self.sg_rows

    @property
    def threads(self) -> int:
        return self.subgroups * LANES

    def check(self) -> None:
        if self.sg_rows not in (8, 16) or self.rows % self.sg_rows:
            raise CompileError(f"xegpu: work-group rows ({self.rows}) must be a multiple of the sub-group's "
                               f"rows ({self.sg_rows}, 8 or 16)")
        for what, n in (("kv_tile", self.kv_tile), ("head dim", self.head_dim), ("value head dim", self.v_head_dim)):
            if n % 32:
                raise CompileError(f"xegpu: {what} {n} is not a multiple of 32 (the 32-wide block loads)")


def _producer(value):
    owner = value.owner
    return owner if not hasattr(owner, "arguments") else None  # a block argument has no producer op


def _walk(op, name: str) -> List:
    found = []

    def visit(o):
        if o.name == name:
            found.append(o)
        from torch_mlir import ir
        return ir.WalkResult.ADVANCE

    op.walk(visit)
    return found


def tag_roles(kernel) -> Dict[str, List]:
    """Tag the anchor ops of one gpu.func by their role: q, k, v (loads), qk, pv (dpas), o (store)."""
    from torch_mlir import ir
    dpas = _walk(kernel, "xegpu.dpas")
    qk = [d for d in dpas if _producer(d.operands[1]) is not None and _producer(d.operands[1]).name == "vector.transpose"]
    pv = [d for d in dpas if d not in qk]
    if len(qk) != 1 or len(pv) != 1:
        raise CompileError(f"xegpu: expected one Q.K^T and one P.V dpas, found {len(qk)} and {len(pv)} "
                           f"(a contraction convert-vector-to-xegpu did not take?)")
    roles = {"qk": qk, "pv": pv, "o": _walk(kernel, "xegpu.store_nd")}
    q = _producer(qk[0].operands[0])
    k = _producer(_producer(qk[0].operands[1]).operands[0])
    v = _producer(pv[0].operands[1])
    for name, op in (("q", q), ("k", k), ("v", v)):
        if op is None or op.name != "xegpu.load_nd":
            raise CompileError(f"xegpu: the {name} operand does not come from a 2D block load "
                               f"({op.name if op is not None else 'a block argument'})")
        roles[name] = [op]
    if len(roles["o"]) != 1:
        raise CompileError(f"xegpu: expected one output store, found {len(roles['o'])}")
    others = [op for op in _walk(kernel, "xegpu.load_nd") if op not in (q, k, v)]
    if len(others) > 1:
        raise CompileError(f"xegpu: {len(others)} other 2D loads in the kernel (expected at most a mask tile)")
    if others:
        roles["mask"] = others
    for role, ops in roles.items():
        for op in ops:
            op.attributes[ROLE] = ir.StringAttr.get(role)
    return roles


def _mask_slice(load):
    """For a 1-D mask tile, the score dim it is broadcast along: [0] for a key vector
    (broadcast over the rows), [1] for a row vector (shape_cast to R x 1, then broadcast over
    the keys); None for a 2-D tile."""
    from torch_mlir import ir
    if ir.VectorType(load.results[0].type).rank != 1:
        return None
    users = [use.owner for use in load.results[0].uses]
    return [1] if any(u.name == "vector.shape_cast" for u in users) else [0]


def _run_script(module, build) -> None:
    """Apply a transform script whose body `build(tagged, root)` writes (tagged(role): the ops
    tagged with that role)."""
    from torch_mlir import ir
    from torch_mlir.dialects import transform
    from torch_mlir.dialects.transform import interpreter, structured
    any_op = transform.AnyOpType.get()
    script = ir.Module.create()
    script.operation.attributes["transform.with_named_sequence"] = ir.UnitAttr.get()
    with ir.InsertionPoint(script.body):
        sequence = transform.NamedSequenceOp("__transform_main", [any_op], [])
        with ir.InsertionPoint(sequence.body):
            root = sequence.bodyTarget

            def tagged(role: str):
                return structured.MatchOp(any_op, root, op_attrs={ROLE: ir.StringAttr.get(role)}).result

            build(tagged, root)
            transform.YieldOp()
    interpreter.apply_named_sequence(module, script.body.operations[0], script)


def _tag_prefetches(module, head_dim: int) -> None:
    """Tag each prefetch by the tile it fetches: a K tile is head_dim wide (when Ev == E the two
    share one layout anyway)."""
    from torch_mlir import ir
    for op in _walk(module.operation, "xegpu.prefetch_nd"):
        width = ir.ShapedType(op.operands[0].type).shape[-1]
        op.attributes[ROLE] = ir.StringAttr.get("k_prefetch" if width == head_dim else "v_prefetch")


def assign_layouts(module, geometry: Geometry) -> None:
    """Tag the anchors of every kernel, insert the K/V prefetches and set the anchor layouts."""
    from torch_mlir.dialects.transform import xegpu as txegpu

    geometry.check()
    kernels = [op for op in _walk(module.operation, "gpu.func")]
    masked, mask_slice = False, None
    for kernel in kernels:
        roles = tag_roles(kernel)
        if "mask" in roles:
            masked, mask_slice = True, _mask_slice(roles["mask"][0])
    n, e, ev, kv = geometry.subgroups, geometry.head_dim, geometry.v_head_dim, geometry.kv_tile
    rows = geometry.sg_rows

    if geometry.prefetch:
        _run_script(module, lambda tagged, root: [txegpu.insert_prefetch(tagged(role), nb_prefetch=geometry.prefetch)
                                                  for role in ("k", "v")])
        _tag_prefetches(module, e)

    def layouts(tagged, root):
        txegpu.set_anchor_layout(tagged("o"), sg_layout=[n, 1], sg_data=[rows, ev])
        txegpu.set_anchor_layout(tagged("q"), sg_layout=[n, 1], sg_data=[rows, e], inst_data=[rows, 32])
        txegpu.set_anchor_layout(tagged("k"), sg_layout=[1, 1], sg_data=[kv, e], order=[0, 1])
        txegpu.set_anchor_layout(tagged("v"), sg_layout=[1, 1], sg_data=[kv, ev], inst_data=[32, 32])
        if geometry.prefetch:
            for role, width in (("k_prefetch", e), ("v_prefetch", ev)):
                if role == "v_prefetch" and ev == e:
                    continue  # tagged k_prefetch: the same tiles
                # the sub-groups share the prefetch of a tile ([4, 2] of them when there are 8 or
                # more, else one row band each); a message is at most 2 blocks of 16 16-bit
                # columns (ocloc refuses 4) and 32 rows
                grid = [4, 2] if n >= 8 else [n, 1]
                data = [kv // grid[0], width // grid[1]]
                txegpu.set_anchor_layout(tagged(role), sg_layout=grid, sg_data=data,
                                         inst_data=[min(data[0], 32), 32 if data[1] % 32 == 0 else 16])
        if masked:  # the mask tile is laid out like the scores it selects (a 1-D mask as a slice)
            if mask_slice is None:
                # A 2-D tile's messages as wide as one dpas result's columns and all the sub-group's
                # rows: left to it, xegpu-propagate-layout picked that or one row per message
                # (twice the loads) from one run to the next.
                txegpu.set_anchor_layout(tagged("mask"), sg_layout=[n, 1], sg_data=[rows, kv], inst_data=[rows, 16])
            else:
                txegpu.set_anchor_layout(tagged("mask"), sg_layout=[n, 1], sg_data=[rows, kv], slice_dims=mask_slice)
        qk, pv = tagged("qk"), tagged("pv")
        txegpu.set_anchor_layout(qk, sg_layout=[n, 1], sg_data=[rows, e], index=0)
        txegpu.set_anchor_layout(qk, sg_layout=[1, 1], sg_data=[e, kv], index=1)
        txegpu.set_anchor_layout(qk, sg_layout=[n, 1], sg_data=[rows, kv], index=2)
        txegpu.set_anchor_layout(pv, sg_layout=[n, 1], sg_data=[rows, kv], index=0)
        txegpu.set_anchor_layout(pv, sg_layout=[1, 1], sg_data=[kv, ev], index=1)
        txegpu.set_anchor_layout(pv, sg_layout=[n, 1], sg_data=[rows, ev], index=2)

    _run_script(module, layouts)
