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
    """Move the loads of the dpas A operands that a loop holds across its steps (the forward's Q
    tile; the backward's Q and dOut in the dQ loop, K and V in the dK/dV loop) into the loop, next
    to the dpas that reads each: every step reads the tile again (an L1 hit after the first)
    instead of holding it in registers across the loop, which frees its bytes in every
    sub-group for the wide head dims."""
    from torch_mlir import ir
    moved = 0
    every = _walk(kernel, "xegpu.dpas")
    for dpas in every:
        loop = _enclosing_loop(dpas)
        a = _producer(dpas.operands[0])
        if loop is None or a is None or a.name != "xegpu.load_nd" or _inside(a, loop):
            continue
        with ir.InsertionPoint(dpas):
            copy = a.clone()
        dpas.operands[0] = copy.results[0]
        if not list(a.results[0].uses):
            a.erase()
        moved += 1
    if every and not moved:
        raise CompileError("xegpu: no dpas A operand is read outside its loop (nothing to re-read per step)")


def loads_next_to_their_use(kernel) -> None:
    """Move every 2D block load in a loop right before the first op of its block that uses it:
    the backward's steps read their B tiles (Q and dOut, or K and V) at the step's start, and a
    tile read early is held in registers next to the ones used before it."""
    for load in _walk(kernel, "xegpu.load_nd"):
        if _enclosing_loop(load) is None:
            continue
        first = _first_in_block(load, [use.owner for use in load.results[0].uses])
        if first is not None:
            load.move_before(first)


def _enclosing_loop(op):
    parent = op.parent
    while parent is not None and parent.name != "gpu.func":
        if parent.name == "scf.for":
            return parent
        parent = parent.parent
    return None


def _inside(op, loop) -> bool:
    parent = op.parent
    while parent is not None and parent.name != "gpu.func":
        if parent == loop:
            return True
        parent = parent.parent
    return False


#: where a tile read by a 2D block load goes, and so its role and layout: a dpas A operand (the
#: tile's rows over the sub-groups), a B operand read column-major because a vector.transpose
#: turns it (whole in every sub-group, the transpose free), a B operand as read (whole, VNNI
#: reads), or element-wise work (like the tiles it meets: the rows over the sub-groups).
#: The role names are the forward's (Q, K, V, its mask tile); the backward's tiles take the same
#: four by their use (its K and V are "q" tiles of the dK/dV loop, Q and dOut "k" and "v" ones).
A_OPERAND, TRANSPOSED_B, B_OPERAND, ELEMENTWISE = "q", "k", "v", "mask"


def _use_class(use) -> str:
    """What a use of a loaded tile makes of it (one of the four roles above)."""
    owner = use.owner
    if owner.name == "xegpu.dpas" and use.operand_number in (0, 1):
        return A_OPERAND if use.operand_number == 0 else B_OPERAND
    if owner.name == "vector.transpose":
        users = [u for u in owner.results[0].uses]
        if users and all(u.owner.name == "xegpu.dpas" and u.operand_number == 1 for u in users):
            return TRANSPOSED_B
    return ELEMENTWISE


def one_use_class_per_load(kernel) -> None:
    """Give each kind of use of a loaded tile a load of its own: a layout belongs to the load, and
    a tile that is both a B operand as read and a transposed one (K in the backward's dQ loop: the
    right operand of Q K^T and of dS K; Q and dOut in its dK/dV loop) needs both layouts.  Each
    load of such a tile sits right before its first use (the same tile read again: an L1 hit),
    so that one B tile, not all of a step's, is live at a time."""
    from torch_mlir import ir
    for load in _walk(kernel, "xegpu.load_nd"):
        groups = {}
        for use in list(load.results[0].uses):
            groups.setdefault(_use_class(use), []).append((use.owner, use.operand_number))
        if len(groups) < 2:
            continue
        firsts = [_first_in_block(load, [owner for owner, _ in uses]) for uses in groups.values()]
        for i, (uses, first) in enumerate(zip(groups.values(), firsts)):
            if i == 0:
                if first is not None:
                    load.move_before(first)
                continue
            with ir.InsertionPoint(first) if first is not None else ir.InsertionPoint.after(load):
                copy = load.clone()
            for owner, number in uses:
                owner.operands[number] = copy.results[0]


def _first_in_block(op, users):
    """The first op of `op`'s block after it that is or holds one of `users` (None if a user
    lies outside the block)."""
    op = op.operation
    block = op.block
    holders = []
    for user in users:
        user = user.operation
        while user.block != block:
            user = user.parent
            if user is None or user.name == "gpu.func":
                return None
            user = user.operation
        holders.append(user)
    later = False
    for candidate in block.operations:
        candidate = candidate.operation
        if candidate == op:
            later = True
        elif later and any(candidate == h for h in holders):
            return candidate
    return None


@dataclass
class Anchor:
    """An anchor op, its role, and the layouts to set on it: (operand index or None, keywords of
    transform.xegpu.set_anchor_layout)."""
    op: object
    role: str
    layouts: List


def tag_roles(kernel, geometry: Geometry) -> List[Anchor]:
    """The anchor ops of one gpu.func, their roles and layouts, from the data flow (the kernel's
    loads each have one kind of use: one_use_class_per_load):

    - every dpas: A and C over the sub-groups' rows ([n, 1], sg_data [r, K] and [r, N]), B whole
      in every sub-group ([1, 1]); "qk" where B is a transposed tile (scores), else "pv";
    - a 2D load by its use (_use_class): an A operand [n, 1] [r, W] in messages of r x w, a
      transposed B [1, 1] read column-major (order [0, 1]), a B as read [1, 1] in messages of up
      to 32 rows x w, element-wise [n, 1] [r, W] in messages of r x 16;
    - a 2D store like the tile it writes ("o"), [n, 1] [r, W];
    - a 1-D scattered store (a row vector: lse, Delta) as a slice along the columns of the tiles
      whose rows it holds ("rows").

    The forward's kernels get what they always had: q, k, v, qk, pv, o and the mask tile."""
    from torch_mlir import ir
    g = geometry
    n, r = g.subgroups, g.sg_rows
    anchors = []

    def rows_of(shape, what):
        if shape[0] != g.rows:
            raise CompileError(f"xegpu: {what} has {shape[0]} rows where the work-group has {g.rows}")

    for dpas in _walk(kernel, "xegpu.dpas"):
        (m, k), (_, cols) = ir.VectorType(dpas.operands[0].type).shape, ir.VectorType(dpas.operands[1].type).shape
        rows_of([m], "a dpas A operand")
        role = "qk" if _is_qk(dpas) else "pv"
        anchors.append(Anchor(dpas, role, [(0, dict(sg_layout=[n, 1], sg_data=[r, k])),
                                           (1, dict(sg_layout=[1, 1], sg_data=[k, cols])),
                                           (2, dict(sg_layout=[n, 1], sg_data=[r, cols]))]))
    for load in _walk(kernel, "xegpu.load_nd"):
        shape = ir.VectorType(load.results[0].type).shape
        classes = {_use_class(use) for use in load.results[0].uses}
        if len(classes) > 1:
            raise CompileError(f"xegpu: a 2D load with uses of several kinds ({sorted(classes)})")
        role = classes.pop() if classes else ELEMENTWISE
        if len(shape) == 1:  # a row or key vector: a slice of the tiles it is broadcast over
            anchors.append(Anchor(load, role, [(None, dict(sg_layout=[n, 1], sg_data=[r, g.kv_tile],
                                                           slice_dims=_mask_slice(load)))]))
            continue
        rows, width = shape
        block = _block_width(width, g.element_bytes)
        if role == A_OPERAND:
            rows_of(shape, "a dpas A operand's load")
            layout = dict(sg_layout=[n, 1], sg_data=[r, width], inst_data=[r, block])
        elif role == TRANSPOSED_B:
            layout = dict(sg_layout=[1, 1], sg_data=[rows, width], order=[0, 1])
        elif role == B_OPERAND:
            layout = dict(sg_layout=[1, 1], sg_data=[rows, width], inst_data=[min(rows, 32), block])
        else:
            # A 2-D tile's messages as wide as one dpas result's columns and all the sub-group's
            # rows: left to it, xegpu-propagate-layout picked that or one row per message
            # (twice the loads) from one run to the next.
            rows_of(shape, "a tile read for element-wise work")
            layout = dict(sg_layout=[n, 1], sg_data=[r, width], inst_data=[r, 16])
        anchors.append(Anchor(load, role, [(None, layout)]))
    for store in _walk(kernel, "xegpu.store_nd"):
        shape = ir.VectorType(store.operands[0].type).shape
        rows_of(shape, "a stored tile")
        anchors.append(Anchor(store, "o", [(None, dict(sg_layout=[n, 1], sg_data=[r, shape[1]]))]))
    for store in _walk(kernel, "xegpu.store"):
        shape = ir.VectorType(store.operands[0].type).shape
        if len(shape) != 1:
            raise CompileError(f"xegpu: a scattered store of a {shape} vector (expected a row vector)")
        rows_of(shape, "a stored row vector")
        anchors.append(Anchor(store, "rows", [(None, dict(sg_layout=[n, 1], sg_data=[r, g.kv_tile],
                                                          inst_data=[1, LANES], slice_dims=[1]))]))
    for anchor in anchors:
        anchor.op.attributes[ROLE] = ir.StringAttr.get(anchor.role)
        anchor.op.attributes[GROUP] = ir.StringAttr.get(_group(anchor))
    return anchors


def _mask_slice(load):
    """For a 1-D tile, the score dim it is broadcast along: [0] for a key vector (broadcast over
    the rows), [1] for a row vector (shape_cast to R x 1, then broadcast over the keys)."""
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


#: a temporary attribute naming each group of anchors that take the same layouts, for the
#: transform script to match (removed once the layouts are set).
GROUP = "attn.xegpu_group"
#: a temporary attribute naming each load whose tile the next step's prefetch fetches.
PREFETCH = "attn.xegpu_prefetch"
#: the rows of a kernel's work-group tiles and of the tiles its loop steps over, where they are not
#: the Geometry's (the backward's dK/dV loop owns keys: set by the outlining stage).
ROWS, STEP = "attn.rows", "attn.step"


def kernel_geometry(kernel, geometry: Geometry) -> Geometry:
    """The geometry of one kernel: `geometry` with the kernel's own rows and step, where set."""
    from dataclasses import replace
    from torch_mlir import ir
    attrs = kernel.attributes
    if ROWS not in attrs:
        return geometry
    return replace(geometry, rows=ir.IntegerAttr(attrs[ROWS]).value, kv_tile=ir.IntegerAttr(attrs[STEP]).value)


def _in_loop(op) -> bool:
    """Whether `op` is in an scf.for that transform.xegpu.insert_prefetch takes: one whose lower
    bound is a constant (it peels the prefetch of the first step; the backward's causal dK/dV loop,
    which starts at the first row tile that sees the keys, it refuses: "Failed to unroll the
    loop")."""
    parent = op.parent
    while parent is not None and parent.name != "gpu.func":
        if parent.name == "scf.for":
            lower = parent.operands[0].owner
            return not hasattr(lower, "arguments") and lower.name == "arith.constant"
        parent = parent.parent
    return False


def _prefetched(anchors: List[Anchor]) -> List[Anchor]:
    """The loads a step of a loop reads whole in every sub-group (B operands, transposed or not),
    the transposed ones first, one per tile (copies of a load read the same tile)."""
    chosen, tiles = [], []
    for role in (TRANSPOSED_B, B_OPERAND):
        for anchor in anchors:
            if anchor.role != role or not _in_loop(anchor.op):
                continue
            tile = (anchor.op.operands[0], tuple(anchor.op.operands[1:]))
            if tile not in tiles:
                tiles.append(tile)
                chosen.append(anchor)
    return chosen


def _prefetch_anchors(kernel, geometry: Geometry) -> List[Anchor]:
    """The prefetches of a kernel, each tagged by the tile it fetches (a tile as wide as the head
    dim is "k_prefetch", when Ev == E all of them) and laid out to be shared by the sub-groups."""
    from torch_mlir import ir
    anchors = []
    for op in _walk(kernel, "xegpu.prefetch_nd"):
        rows, width = ir.ShapedType(op.operands[0].type).shape
        grid, data, inst = replace_rows(geometry, rows).prefetch_layout(width)
        role = "k_prefetch" if width == geometry.head_dim else "v_prefetch"
        anchor = Anchor(op, role, [(None, dict(sg_layout=grid, sg_data=data, inst_data=inst))])
        op.attributes[ROLE] = ir.StringAttr.get(role)
        op.attributes[GROUP] = ir.StringAttr.get(_group(anchor))
        anchors.append(anchor)
    return anchors


def replace_rows(geometry: Geometry, step: int) -> Geometry:
    from dataclasses import replace
    return geometry if step == geometry.kv_tile else replace(geometry, kv_tile=step)


def _set_layouts(module, anchors: List[Anchor]) -> None:
    """One transform script setting every anchor's layouts: the anchors that take the same
    layouts share one match, by the GROUP tag tag_roles set (copies of a tagged op, such as
    float32's six DPAS of a product, are matched with it); the tags go afterwards."""
    from torch_mlir import ir
    from torch_mlir.dialects.transform import xegpu as txegpu
    groups = {}
    for anchor in anchors:
        groups.setdefault(_group(anchor), anchor.layouts)

    def build(tagged, root):
        for key, layouts in groups.items():
            ops = _match(root, GROUP, key)
            for index, layout in layouts:
                txegpu.set_anchor_layout(ops, **layout, **({} if index is None else {"index": index}))

    _run_script(module, build)

    def untag(op):
        if GROUP in op.attributes:
            del op.attributes[GROUP]
        return ir.WalkResult.ADVANCE

    module.operation.walk(untag)


def _group(anchor: Anchor) -> str:
    return repr(anchor.layouts)


def assign_layouts(module, geometry: Geometry) -> None:
    """Tag the anchors of every kernel, insert the prefetches of the tiles its loop streams and
    set the anchor layouts."""
    from torch_mlir import ir
    from torch_mlir.dialects.transform import xegpu as txegpu

    geometry.check()
    kernels = [op for op in _walk(module.operation, "gpu.func")]
    anchors, per_kernel = [], []
    for kernel in kernels:
        g = kernel_geometry(kernel, geometry)
        g.check()
        if g.reload_q:
            reload_q_per_step(kernel)
            if ROWS in kernel.attributes:  # the backward's kernels
                loads_next_to_their_use(kernel)
        one_use_class_per_load(kernel)
        found = tag_roles(kernel, g)
        if g.element_bytes == 4:
            from .f32 import split_f32_dpas
            split_f32_dpas(kernel)
        anchors += found
        per_kernel.append((kernel, g, _prefetched(found)))

    if geometry.prefetch:
        fetched = [anchor for _, _, chosen in per_kernel for anchor in chosen]
        for number, anchor in enumerate(fetched):
            anchor.op.attributes[PREFETCH] = ir.StringAttr.get(str(number))
        _run_script(module, lambda tagged, root: [
            txegpu.insert_prefetch(_match(root, PREFETCH, str(number)), nb_prefetch=geometry.prefetch)
            for number in range(len(fetched))])
        for anchor in fetched:
            del anchor.op.attributes[PREFETCH]
        for kernel, g, _ in per_kernel:
            anchors += _prefetch_anchors(kernel, g)

    _set_layouts(module, anchors)
    _row_vector_stores_as_reduced(module)
    if geometry.element_bytes == 4:
        _plain_f32_loads(module)


def _row_vector_stores_as_reduced(module) -> None:
    """A stored row vector (lse, Delta) keeps the layout of the row reduction that made it (a
    slice of lanes [1, 16] and instructions [1, 16]: every lane holds the sub-group's rows), and
    the store writes it from there.  Left to layout propagation, the scattered store asks for one
    row a lane, and that layout, propagated back through the key loop, reached the scores'
    reductions (lanes [16, 1] on an 8 x 16 tile: "data cannot be evenly distributed")."""
    from torch_mlir import ir
    for op in _with_role(module, "xegpu.store", "rows"):
        text = str(op.attributes["layout"])
        if not text.startswith("#xegpu.slice<#xegpu.layout<") or "lane_layout" in text:
            raise CompileError(f"xegpu: unexpected layout on a row vector's store: {text}")
        head, tail = text.split(">, dims", 1)
        op.attributes["layout"] = ir.Attribute.parse(head + ", lane_layout = [1, 16], lane_data = [1, 1]>, dims" + tail)


def _with_role(module, name: str, role: str) -> List:
    """The ops named `name` tagged with `role`."""
    from torch_mlir import ir
    return [op for op in _walk(module.operation, name)
            if ROLE in op.attributes and ir.StringAttr(op.attributes[ROLE]).value == role]


def _match(root, name: str, value: str):
    from torch_mlir import ir
    from torch_mlir.dialects import transform
    from torch_mlir.dialects.transform import structured
    return structured.MatchOp(transform.AnyOpType.get(), root, op_attrs={name: ir.StringAttr.get(value)}).result


def _plain_f32_loads(module) -> None:
    """f32 V tiles read as they lie (lane n holds column n): left to layout propagation, the bf16
    parts' VNNI layout (2 rows a lane) reaches the f32 load, which XeVM then asks to pack (a
    transformed read), which exists for 8- and 16-bit elements only ("'xevm.blockload2d' op
    pack_register is only supported for 8 and 16 bit elements")."""
    from torch_mlir import ir
    for op in _with_role(module, "xegpu.load_nd", "v"):
        text = str(op.attributes["layout"])
        if not text.endswith(">") or "lane_layout" in text:
            raise CompileError(f"xegpu: unexpected layout on the V load: {text}")
        op.attributes["layout"] = ir.Attribute.parse(text[:-1] + ", lane_layout = [1, 16], lane_data = [1, 1]>")
