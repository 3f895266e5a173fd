"""The shared schedule: the stages every target runs, in order.

    tiled       tiling.tile_and_fuse      softmax decomposed; parallel dims -> the work-group scf.forall
    flash       flash.flash_rewrite       each work-group -> online-softmax scf.for over K/V tiles, on vectors
    bufferized  bufferize.bufferize      tensors -> the caller's buffers (and function-level workspaces)

The stages import MLIR; this package's own import does not (ScheduleOptions
and the stage names serve machines that only run precompiled kernels).
"""

from .options import ScheduleOptions

#: the shared stages' names, in order.
SHARED_STAGE_NAMES = ("tiled", "flash", "bufferized")


def shared_stages():
    """(name, stage function) of the shared stages, in order."""
    from .bufferize import bufferize
    from .flash import flash_rewrite
    from .tiling import tile_and_fuse
    return (("tiled", tile_and_fuse), ("flash", flash_rewrite), ("bufferized", bufferize))


__all__ = ["SHARED_STAGE_NAMES", "ScheduleOptions", "shared_stages"]
