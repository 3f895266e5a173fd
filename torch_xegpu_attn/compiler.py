"""The compiler driver: runs the named stages for one spec and target.

    payload -> tiled -> flash -> bufferized -> <target stages> -> binary

Each stage maps IR to IR, so any stage's output can be dumped (`dump_dir`, or
XEGPU_ATTN_DUMP_IR) and compilation can stop after any of them (`stop_after`,
or XEGPU_ATTN_STOP_AFTER).  `python -m torch_xegpu_attn` exposes the same from
the command line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from . import knobs
from .errors import KernelNotAvailable
from .schedule import SHARED_STAGE_NAMES, ScheduleOptions
from .spec import AttentionSpec
from .targets import KernelArtifact, get_target
from .targets.base import TargetOptions

#: every compilation is logged here (INFO: spec, target, options, seconds per stage);
#: silent unless the application configures logging or XEGPU_ATTN_LOG=1.
LOGGER = logging.getLogger("torch_xegpu_attn")

#: counts of expensive work, for tests and tools (a cache hit must not move them).
COUNTERS: Dict[str, int] = {"compilations": 0, "payloads_built": 0}
_COUNTER_LOCK = threading.Lock()


class CompilationStopped(RuntimeError):
    """Compilation was asked to stop after a stage; `ir` holds that stage's IR."""

    def __init__(self, stage: str, ir_text: str):
        super().__init__(f"compilation stopped after stage {stage!r} (XEGPU_ATTN_STOP_AFTER / stop_after)")
        self.stage = stage
        self.ir = ir_text


@dataclass
class CompileReport:
    """Timing per stage of one compilation (seconds)."""

    stage_seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.stage_seconds.values())


def stage_names(target_name: str = "cpu") -> List[str]:
    target = get_target(target_name)
    return ["payload", *SHARED_STAGE_NAMES, *target.stage_names(), "binary"]


def compiler_available():
    """(True, "") when the pinned MLIR bindings import here, else (False, why)."""
    try:
        import mlir.ir  # noqa: F401
    except ImportError as error:
        return False, f"the MLIR Python bindings are not installed: {error}"
    return True, ""


def precompile_hint(spec: AttentionSpec) -> str:
    """The command that puts the kernel of `spec` into the disk cache (on a machine with MLIR)."""
    mask = f" --mask {spec.mask.kind}:{''.join(spec.mask.dims)}" if spec.mask is not None else ""
    return (f"python -m torch_xegpu_attn precompile --target {spec.target} --group {spec.group} "
            f"--head-dim {spec.head_dim} --v-head-dim {spec.v_head_dim} --dtype {spec.dtype} "
            f"--length-class {spec.length_class} --scale {float(spec.scale).hex()}"
            f"{' --causal' if spec.causal else ''}{mask}, or torch_xegpu_attn.precompile(query, key, value, ...)")


def dump_folder_name(spec: AttentionSpec, options: TargetOptions) -> str:
    """The folder (under the dump directory) of one kernel's IR dumps."""
    return f"{spec.short_name()}-{options.short_name()}"


def _bump(name: str) -> None:
    with _COUNTER_LOCK:
        COUNTERS[name] += 1


def compile_spec(spec: AttentionSpec, dump_dir: Optional[str] = None, stop_after: Optional[str] = None,
                 report: Optional[CompileReport] = None,
                 options: Union[TargetOptions, ScheduleOptions, None] = None) -> KernelArtifact:
    """Compile `spec` for `spec.target` and return the binary with its launch metadata.

    `options` overrides the target's choice: its whole TargetOptions, or only the
    shared schedule's (tests drive the shared stages with other targets' schedules
    through the cpu target).
    """
    target = get_target(spec.target)
    ok, why = compiler_available()
    if ok:
        ok, why = target.available()
    if not ok:
        raise KernelNotAvailable(f"the {spec.target} target cannot compile here ({why}); the kernel of "
                                 f"{spec.short_name()} must come from the disk cache: precompile it on a "
                                 f"machine with the toolchain ({precompile_hint(spec)})")
    dump_dir = dump_dir if dump_dir is not None else knobs.dump_ir_dir()
    stop_after = stop_after if stop_after is not None else knobs.stop_after()
    names = stage_names(spec.target)
    if stop_after is not None and stop_after not in names:
        raise ValueError(f"unknown stage {stop_after!r}; stages are: {', '.join(names)}")
    report = report if report is not None else CompileReport()
    if options is None:
        options = target.options_for(spec)
    elif isinstance(options, ScheduleOptions):
        options = dataclasses.replace(target.options_for(spec), schedule=options)
    if dump_dir:
        dump_dir = os.path.join(dump_dir, dump_folder_name(spec, options))
        os.makedirs(dump_dir, exist_ok=True)
    _bump("compilations")

    from .mlir_utils import mlir_context
    from .payload import build_attention_payload
    from .schedule import shared_stages
    with mlir_context():
        start = time.perf_counter()
        module = build_attention_payload(spec)
        _bump("payloads_built")
        _finish_stage(0, "payload", module, start, dump_dir, stop_after, report)
        stages = [(name, run, options.schedule) for name, run in shared_stages()]
        stages += [(name, run, options) for name, run in target.stages()]
        for i, (name, run, stage_options) in enumerate(stages, start=1):
            start = time.perf_counter()
            module = run(module, spec, stage_options)
            _finish_stage(i, name, module, start, dump_dir, stop_after, report)
        start = time.perf_counter()
        artifact = target.emit(module, spec, options, keep_dir=dump_dir or "")
        report.stage_seconds["binary"] = time.perf_counter() - start
    LOGGER.info("compiled %s for %s (%s) in %.3f s: %s", spec.short_name(), spec.target, options.short_name(),
                report.total, ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in report.stage_seconds.items()))
    return artifact


def _finish_stage(i, name, module, start, dump_dir, stop_after, report) -> None:
    report.stage_seconds[name] = time.perf_counter() - start
    if not module.operation.verify():
        raise RuntimeError(f"stage {name!r} produced IR that does not verify")
    if dump_dir:
        with open(os.path.join(dump_dir, f"{i:02d}-{name}.mlir"), "w") as f:
            f.write(str(module))
    if stop_after == name:
        raise CompilationStopped(name, str(module))
