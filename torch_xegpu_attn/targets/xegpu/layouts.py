"""xegpu stage "xegpu-wg": the work-group kernel in XeGPU ops, with layouts on its anchor ops.

Runs in the upstream MLIR of torch-mlir (the work-group XeGPU pipeline lives
there).  `convert-vector-to-xegpu` turns the transfers into 2D tensor
descriptors whose shape is the operand's run-time shape (reads past it give 0,
stores past it are dropped: tails cost nothing) and both contractions into
xegpu.dpas; then each anchor op gets a layout in XeGPU's terms, and
`xegpu-propagate-layout` gives every other op the layout its anchors imply.

How a work-group is cut (Geometry): R rows (the schedule's row tile) over
n = R / r sub-groups of 16 lanes, r rows each (16 or 8); every sub-group reads
the whole K and V tiles of a step.  w below is the columns of one block
message: 32 for 16-bit tiles whose width is a multiple of 32, else 16 (and 16
for f32).

    op                   sg_layout   sg_data            inst_data
    Q load, Q operand    [n, 1]      [r, E]             [r, w]  (loads only; with reload_q the
                                                        load sits in the key loop)
    K load               [1, 1]      [kv, E]            (order [0, 1]: read column-major, so the
                                                         transpose before the dpas is free)
    K^T operand          [1, 1]      [E, kv]
    S = Q K^T, P         [n, 1]      [r, kv]
    V load, V operand    [1, 1]      [kv, Ev]           [min(kv, 32), w]  (loads only)
    O, the store         [n, 1]      [r, Ev]
    K/V prefetches       [bands, columns] (Geometry.prefetch_layout: the sub-groups share a
                         tile's prefetch, each one message of up to 32 rows x w columns where
                         there are enough sub-groups)

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
    reload_q: bool = False   # read the Q tile at every step (from the cache) instead of holding it
    element_bytes: int = 2   # of Q, K and V (4 for float32)

    @property
    def subgroups(self) -> int:
        return self.rows // self.sg_rows

    @property
    def threads(self) -> int:
        return self.subgroups * LANES

    def prefetch_layout(self, width: int):
        """(sg_layout, sg_data, inst_data) of the prefetch of a K or V tile `width` columns wide,
        shared by the sub-groups.  The tile is cut into column blocks as wide as one message (32
        16-bit columns where they divide the width, else 16: ocloc refuses wider prefetches, and
        32 bytes is the narrowest message; 16 32-bit columns) and row bands; of the grids that fit
        the sub-groups, the one with the fewest messages per sub-group (then the most sub-groups
        sharing the work) is taken."""
        block = _block_width(width, self.element_bytes)
        blocks = width // block
        best = None
        for bands in (b for b in range(1, self.kv_tile + 1) if self.kv_tile % b == 0):
            for columns in (c for c in range(1, blocks + 1) if blocks % c == 0):
                if bands * columns > self.subgroups:
                    continue
                rows = self.kv_tile // bands
                messages = (blocks // columns) * -(-rows // 32)
                key = (messages, -bands * columns, -columns)
                if best is None or key < best[0]:
                    best = (key, [bands, columns])
        grid = best[1]
        data = [self.kv_tile // grid[0], width // grid[1]]
        return grid, data, [min(data[0], 32), block]

    def check(self) -> None:
        if self.sg_rows not in (8, 16) or self.rows % self.sg_rows:
            raise CompileError(f"xegpu: work-group rows ({self.rows}) must be a multiple of the sub-group's "
                               f"rows ({self.sg_rows}, 8 or 16)")
        for what, n in (("kv_tile", self.kv_tile), ("head dim", self.head_dim), ("value head dim", self.v_head_dim)):
            if n % 16:
                raise CompileError(f"xegpu: {what} {n} is not a multiple of 16 (the 16-wide block loads)")


def _block_width(columns: int, element_bytes: int = 2) -> int:
    """Columns of one 2D block message over a tile `columns` wide: for 16-bit elements 32 (two
    16-column blocks) where they divide it, else 16 (32 bytes, the narrowest a message reads);
    for 32-bit elements 16 (64 bytes, the widest one block of a load or prefetch holds)."""
    if element_bytes == 4:
        return 16
    return 32 if columns % 32 == 0 else 16


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


def _is_qk(dpas) -> bool:
    """Whether a dpas is Q.K^T: its B operand is the transposed K tile."""
    producer = _producer(dpas.operands[1])
    return producer is not None and producer.name == "vector.transpose"


def reload_q_per_step(kernel) -> None:
    """Move the Q tile's load into the key loop, next to the Q.K^T dpas that reads it: each step
    reads Q again (an L1 hit after the first) instead of holding it in registers across the
    loop, which frees E * rows * 2 bytes per sub-group for the wide head dims."""
    qk = [d for d in _walk(kernel, "xegpu.dpas") if _is_qk(d)]
    if len(qk) != 1:
        raise CompileError(f"xegpu: expected one Q.K^T dpas, found {len(qk)}")
    q = _producer(qk[0].operands[0])
    if q is None or q.name != "xegpu.load_nd":
        raise CompileError("xegpu: the Q operand does not come from a 2D block load")
    from torch_mlir import ir
    with ir.InsertionPoint(qk[0]):
        copy = q.clone()
    qk[0].operands[0] = copy.results[0]
    if not list(q.results[0].uses):
        q.erase()


def tag_roles(kernel) -> Dict[str, List]:
    """Tag the anchor ops of one gpu.func by their role: q, k, v (loads), qk, pv (dpas), o (store)."""
    from torch_mlir import ir
    dpas = _walk(kernel, "xegpu.dpas")
    qk = [d for d in dpas if _is_qk(d)]
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
        if geometry.reload_q:
            reload_q_per_step(kernel)
        roles = tag_roles(kernel)
        if geometry.element_bytes == 4:
            from .f32 import split_f32_dpas
            split_f32_dpas(kernel)
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
        q_width, v_width = _block_width(e, geometry.element_bytes), _block_width(ev, geometry.element_bytes)
        txegpu.set_anchor_layout(tagged("q"), sg_layout=[n, 1], sg_data=[rows, e], inst_data=[rows, q_width])
        txegpu.set_anchor_layout(tagged("k"), sg_layout=[1, 1], sg_data=[kv, e], order=[0, 1])
        txegpu.set_anchor_layout(tagged("v"), sg_layout=[1, 1], sg_data=[kv, ev], inst_data=[min(kv, 32), v_width])
        if geometry.prefetch:
            for role, width in (("k_prefetch", e), ("v_prefetch", ev)):
                if role == "v_prefetch" and ev == e:
                    continue  # tagged k_prefetch: the same tiles
                grid, data, inst = geometry.prefetch_layout(width)
                txegpu.set_anchor_layout(tagged(role), sg_layout=grid, sg_data=data, inst_data=inst)
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
    if geometry.element_bytes == 4:
        _plain_f32_loads(module)


def _plain_f32_loads(module) -> None:
    """f32 V tiles read as they lie (lane n holds column n): left to layout propagation, the bf16
    parts' VNNI layout (2 rows a lane) reaches the f32 load, which XeVM then asks to pack (a
    transformed read), which exists for 8- and 16-bit elements only ("'xevm.blockload2d' op
    pack_register is only supported for 8 and 16 bit elements")."""
    from torch_mlir import ir
    for op in _walk(module.operation, "xegpu.load_nd"):
        if ROLE not in op.attributes or ir.StringAttr(op.attributes[ROLE]).value != "v":
            continue
        text = str(op.attributes["layout"])
        if not text.endswith(">") or "lane_layout" in text:
            raise CompileError(f"xegpu: unexpected layout on the V load: {text}")
        op.attributes["layout"] = ir.Attribute.parse(text[:-1] + ", lane_layout = [1, 16], lane_data = [1, 1]>")
