"""Shared stage "tiled": decompose softmax, tile and fuse the parallel dims into scf.forall.

After this stage every work-group (one scf.forall iteration) owns `row_tile`
query rows of one (batch, kv-head, group) and holds the whole unfused chain
for them: QK^T, scale, mask/causal, the four softmax generics and P.V, on
tensors of shape (1, 1, 1, rows, S).  The flash stage then removes the S-long
tensors.

Row tails: when `row_tile` does not divide L, the result op is split at the
last multiple of `row_tile` and each part gets its own forall, so every tensor
keeps a static shape (the tail forall has one row tile of L % row_tile rows).
"""

from __future__ import annotations

from mlir import ir
from mlir.dialects import transform
from mlir.dialects.transform import structured

from ..mlir_utils import TransformScript, any_op, apply_cleanup, match_attr, match_ops, match_tag
from ..spec import AttentionSpec
from .options import ScheduleOptions


def tile_and_fuse(module: ir.Module, spec: AttentionSpec, options: ScheduleOptions) -> ir.Module:
    """Run the tiling schedule on `module` in place and return it."""
    with TransformScript() as script:
        root = script.root
        func = match_ops(root, ["func.func"])
        structured.DecomposeInterfaceOp(any_op(), match_tag(root, "softmax"))
        if not options.fuse_k_transpose:
            _tile_transpose_apart(root, spec, options)
        result = match_attr(root, "attn.root")
        for part in _split_row_tail(result, spec.q_len, options.row_tile):
            # Tile (b, h, g, rows) and pull the whole producer chain into the forall.
            structured.FuseOp(part, tile_sizes=[1, 1, 1, options.row_tile], use_forall=True,
                              apply_cleanup=True)
        apply_cleanup(func)
    script.apply(module)
    return module


def _tile_transpose_apart(root, spec: AttentionSpec, options: ScheduleOptions) -> None:
    """Give K^T its own forall over (b, h) so that fusion stops there and it is materialized."""
    tiled = structured.TileUsingForallOp(match_tag(root, "k_transpose"), tile_sizes=[1, 1]).tiled_op
    if options.transpose_tile is not None:
        te, ts = options.transpose_tile
        if spec.head_dim % te or spec.kv_len % ts:
            raise ValueError(f"transpose tile {options.transpose_tile} must divide (E, S)")
        structured.TileUsingForOp(tiled, sizes=[0, 0, te, ts])


def _split_row_tail(handle, q_len: int, row_tile: int):
    """Handles of the parts to tile: the whole op, or a multiple-of-tile part and the tail."""
    tail = q_len % row_tile
    if q_len <= row_tile or tail == 0:
        return [handle]
    parts = structured.SplitOp(handle, 3, q_len - tail).result
    return list(transform.SplitHandleOp([any_op(), any_op()], parts).results)
