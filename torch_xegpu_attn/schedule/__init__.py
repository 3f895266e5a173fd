"""The shared schedule: the stages every target runs, in order.

    tiled       tiling.tile_and_fuse      parallel dims -> scf.forall, softmax decomposed
    flash       flash.flash_rewrite       online-softmax scf.for over K/V tiles
    vectorized  vectorize.vectorize       linalg -> vector, loop-carried vectors
    bufferized  vectorize.bufferize       tensors -> the caller's buffers
"""

from .flash import flash_rewrite
from .options import ScheduleOptions
from .tiling import tile_and_fuse
from .vectorize import bufferize, vectorize

SHARED_STAGES = (
    ("tiled", tile_and_fuse),
    ("flash", flash_rewrite),
    ("vectorized", vectorize),
    ("bufferized", bufferize),
)

__all__ = ["SHARED_STAGES", "ScheduleOptions", "tile_and_fuse", "flash_rewrite", "vectorize", "bufferize"]
