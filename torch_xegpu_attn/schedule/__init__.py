"""The shared schedule: the stages every target runs, in order.

    tiled       tiling.tile_and_fuse      softmax decomposed; parallel dims -> the work-group scf.forall
    flash       flash.flash_rewrite       each work-group -> online-softmax scf.for over K/V tiles, on vectors
    bufferized  bufferize.bufferize      tensors -> the caller's buffers (and function-level workspaces)
"""

from .flash import flash_rewrite
from .options import ScheduleOptions
from .tiling import tile_and_fuse
from .bufferize import bufferize

SHARED_STAGES = (
    ("tiled", tile_and_fuse),
    ("flash", flash_rewrite),
    ("bufferized", bufferize),
)

__all__ = ["SHARED_STAGES", "ScheduleOptions", "tile_and_fuse", "flash_rewrite", "bufferize"]
