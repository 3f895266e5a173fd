"""The interface every target implements.  Targets are peers; the compiler only sees this.

A target owns its options (a frozen, validated TargetOptions: the shared
schedule's plus its own knobs and the machine it compiles for), its stages,
its toolchain's identity and its launcher (a Kernel).  A target module
imports MLIR only inside its stages and `emit`: the registry, length classes,
options, identities and loaders serve a machine that runs precompiled kernels
without the compiler.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .. import knobs
from ..schedule.options import ScheduleOptions
from ..spec import TARGET_DEVICES, AttentionSpec, ProblemSize

#: A stage maps IR to IR: fn(module, spec, options) -> module (an mlir.ir.Module, usually the same
#: object); the shared stages get `options.schedule`, the target's own stages its whole options.
Stage = Tuple[str, Callable[[Any, AttentionSpec, Any], Any]]


@dataclass(frozen=True)
class TargetOptions:
    """Everything a target builds one kernel with: the shared schedule's options and the target's
    own knobs (subclasses add them as fields, validated in __post_init__), including the machine
    it compiles for.  Frozen and hashed: `to_json` is part of the cache key."""

    schedule: ScheduleOptions

    def to_json(self) -> str:
        """Stable text form (part of the cache key)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def own_name(self) -> List[str]:
        """The target's own knobs, for `short_name`: what differs from their defaults."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "schedule" and f.default is not dataclasses.MISSING and value != f.default:
                parts.append(f"{f.name}-{value}".replace(" ", ""))
        return parts

    def short_name(self) -> str:
        return "_".join([self.schedule.short_name(), *self.own_name()])

    def with_fields(self, **fields) -> "TargetOptions":
        """A copy with `fields` replaced, each a field of these options or of the schedule's
        (unknown fields raise TypeError, bad values ValueError)."""
        own = {f.name for f in dataclasses.fields(self)} - {"schedule"}
        shared = {f.name for f in dataclasses.fields(ScheduleOptions)}
        unknown = set(fields) - own - shared
        if unknown:
            raise TypeError(f"unknown option fields {sorted(unknown)} (the target's: {sorted(own)}; the "
                            f"shared schedule's: {sorted(shared)})")
        schedule = dataclasses.replace(self.schedule, **{k: v for k, v in fields.items() if k in shared})
        return dataclasses.replace(self, schedule=schedule, **{k: v for k, v in fields.items() if k in own})


class Kernel:
    """What a target's `load` returns: a launcher of one compiled kernel.  Called with the
    canonical operands (q, k, v, [mask], out), it runs the kernel on them.  The defaults are
    those of a launcher that does not replay calls in C++."""

    #: whether the launcher counts its launches itself (else the op counts them, _C.count_launch).
    counts_launches: bool = False

    def __call__(self, operands: Sequence) -> None:
        raise NotImplementedError

    def record(self, op: str, arguments, flags, operands, roles, results) -> bool:
        """Record a checked call of `op` ("forward", "forward_lse" or "backward") for replay in
        C++: its tensor arguments (frontend.ARGUMENTS' numbering, None where absent), flags
        (dropout_p, is_causal, scale, enable_gqa), the kernel's operands with their roles
        (frontend.Plan.roles) and the op's results.  False when the launcher does not replay that
        call."""
        return False

    def last_use(self) -> int:
        """When the kernel last ran, on the clock every launcher shares (larger is more recent);
        0 where the launcher does not keep one."""
        return 0

    def forget(self) -> None:
        """The kernel leaves the memory cache: drop what refers to it (recorded calls)."""


@dataclass
class KernelArtifact:
    """What compiling one spec for one target yields: a binary and what launching it needs."""

    binary: bytes
    metadata: Dict = field(default_factory=dict)


class Target(abc.ABC):
    """A compilation target: its options, its stages after the shared schedule, its binary, its
    toolchain's identity and its launcher."""

    #: target name used in specs ("cpu", "nvvm", "xegpu").
    name: str = ""
    #: torch device type whose tensors this target serves.
    device_type: str = ""
    #: file suffix of the binary in the disk cache.
    binary_suffix: str = ".bin"

    def length_class(self, size: ProblemSize, spec: AttentionSpec, arch: Optional[str] = None) -> str:
        """The coarse length class of a problem (AttentionSpec.length_class) whose spec, but for
        its class, is `spec`, on the machine `arch` names (as in `default_options`): a target
        that wants different tiles for short and long problems says so here (only for the specs
        whose tiles do change, so that no two classes build the same kernel); one class by
        default."""
        return "any"

    def classified(self, spec: AttentionSpec, size: ProblemSize, arch: Optional[str] = None) -> AttentionSpec:
        """`spec` in the length class this target gives a problem of `size` on `arch`: the spec
        of the kernel that problem runs."""
        return dataclasses.replace(spec, length_class=self.length_class(size, spec, arch))

    @abc.abstractmethod
    def default_options(self, spec: AttentionSpec, arch: Optional[str]) -> TargetOptions:
        """The options the target builds `spec` with, for the machine `arch` names (None: this
        machine's device, or the target's default architecture where it has none)."""

    def options_for(self, spec: AttentionSpec, arch: Optional[str] = None) -> TargetOptions:
        """The options a kernel of `spec` is built with: the target's choice, with the fields of
        XEGPU_ATTN_SCHEDULE (if set; the schedule's or the target's own) overriding it."""
        options = self.default_options(spec, arch)
        overrides = knobs.schedule_overrides()
        if overrides:
            try:
                options = options.with_fields(**overrides)
            except (TypeError, ValueError) as error:
                raise knobs.KnobError(f"XEGPU_ATTN_SCHEDULE: {error}") from None
        return options

    def check(self, spec: AttentionSpec) -> None:
        """Raise NotImplementedError (saying what to change) for a spec the target does not take;
        the frontend calls it before any compile."""

    @abc.abstractmethod
    def stage_names(self) -> Sequence[str]:
        """The names of the target's IR stages (without importing them)."""

    @abc.abstractmethod
    def stages(self) -> Sequence[Stage]:
        """The target's IR stages, run after the shared ones (imports the compiler)."""

    @abc.abstractmethod
    def emit(self, module, spec: AttentionSpec, options: TargetOptions,
             keep_dir: str = "") -> KernelArtifact:
        """Turn the last stage's IR into a binary plus launch metadata.

        `keep_dir`, when set, receives the target's intermediate files (the IR dump directory).
        """

    @abc.abstractmethod
    def load(self, binary_path: str, metadata: Dict) -> Kernel:
        """Load a binary written to disk; return its launcher."""

    @abc.abstractmethod
    def toolchain(self) -> Optional[Dict[str, str]]:
        """The identity of the tools that make this target's binaries (their versions), part of
        the cache key (as Triton's backends hash their ptxas version): a new tool version never
        loads a kernel an older one built.  None where the tools are not here (a machine that
        runs precompiled kernels takes them as the compiling machine's tools made them)."""

    def prepare(self) -> None:
        """Make the launcher usable (called before the first kernel of the target is loaded)."""

    def available(self) -> Tuple[bool, str]:
        """Whether this target can compile here, and why not."""
        return True, ""

    def clear_recorded(self) -> None:
        """Forget the calls the target's launcher recorded for replay (if it has one loaded)."""

    def recorded_signatures(self) -> int:
        """Call signatures the target's launcher keeps for replay, beyond the op's own (_C)."""
        return 0

    def loaded_modules(self) -> int:
        """Binaries the target's launcher holds loaded now (the memory cache bounds them)."""
        return 0


def package_versions(names: Sequence[str]) -> Dict[str, str]:
    """Installed versions of Python packages (a toolchain's identity), "absent" for the missing."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


#: the input dtypes of the GPU targets' matrix engines (f32 accumulation).
MATRIX_ENGINE_DTYPES = ("float16", "bfloat16")


def require_matrix_engine_dtype(spec: AttentionSpec, target: str, engine: str,
                                accepted: Sequence[str] = MATRIX_ENGINE_DTYPES) -> None:
    """Raise NotImplementedError for a spec whose inputs a GPU target's matrix engine (`engine`:
    tensor cores, DPAS) does not take (`accepted`), saying what to do instead."""
    if spec.dtype not in accepted:
        raise NotImplementedError(
            f"the {target} target computes on {engine} with {', '.join(accepted)} inputs; {spec.dtype} is not "
            f"implemented there: cast the inputs to one of those")


_REGISTRY: Dict[str, Target] = {}


def register(target: Target) -> Target:
    if TARGET_DEVICES.get(target.name) != target.device_type:
        raise ValueError(f"target {target.name!r} for {target.device_type} tensors is not in spec.TARGET_DEVICES")
    _REGISTRY[target.name] = target
    return target


def get_target(name: str) -> Target:
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in TARGET_DEVICES:
            why = f"is not implemented yet ({TARGET_DEVICES[name]} tensors)"
        else:
            why = "does not exist"
        raise NotImplementedError(f"the {name!r} target {why}; available: {sorted(_REGISTRY)}") from None


def target_for_device(device_type: str) -> str:
    """Name of the target that serves tensors of `device_type` (implemented or planned)."""
    for name, device in TARGET_DEVICES.items():
        if device == device_type:
            return name
    served = sorted(TARGET_DEVICES.values())
    raise NotImplementedError(f"xegpu::attention has no target for {device_type} tensors (devices: {served})")


def registered() -> List[str]:
    return sorted(_REGISTRY)
