"""AttentionSpec: one normalized attention problem, and the compile-cache key.

Everything that changes the compiled binary lives here and nothing else does:
two calls with equal specs can share one kernel.  Strides are *not* part of
the spec: the kernels read their inputs through memrefs with dynamic strides
(innermost stride 1), so a transposed or sliced input needs no new binary.

The problem is always described in the kernel's canonical 5-D form

    q   (B, H, G, L, E)     B = product of the batch dims, H = key/value heads,
    k   (B, H, S, E)        G = query heads per key/value head (1 without GQA)
    v   (B, H, S, Ev)
    out (B, H, G, L, Ev)

and an optional mask that varies along a subset of (b, h, g, l, s).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional, Tuple

#: dtypes the kernels accept, by their torch name.
DTYPES = ("float32", "float16", "bfloat16")

#: the loop dimensions of the canonical problem, in order.
MASK_DIMS = ("b", "h", "g", "l", "s")

#: targets that can compile a spec.
TARGETS = ("cpu", "nvvm", "xegpu")


@dataclass(frozen=True)
class MaskSpec:
    """An attention mask in compact form.

    kind   "bool" (True = attend, passed to the kernel as one byte per element)
           or "additive" (added to the scaled scores).
    dims   the loop dims, in (b, h, g, l, s) order, along which the mask varies;
           the kernel's mask operand has exactly these dims.  Every other dim is
           broadcast.
    dtype  the element type of the mask operand ("bool" or a float dtype).
    """

    kind: str
    dims: Tuple[str, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.kind not in ("bool", "additive"):
            raise ValueError(f"mask kind must be 'bool' or 'additive', got {self.kind!r}")
        if tuple(d for d in MASK_DIMS if d in self.dims) != tuple(self.dims):
            raise ValueError(f"mask dims must be an ordered subset of {MASK_DIMS}, got {self.dims!r}")
        if self.kind == "bool" and self.dtype != "bool":
            raise ValueError("a bool mask has dtype 'bool'")
        if self.kind == "additive" and self.dtype not in DTYPES:
            raise ValueError(f"additive mask dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True)
class AttentionSpec:
    """One attention problem in canonical form; hashable, immutable, the cache key."""

    batch: int
    kv_heads: int
    group: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    dtype: str
    causal: bool = False
    scale: Optional[float] = None
    mask: Optional[MaskSpec] = None
    target: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("batch", "kv_heads", "group", "q_len", "kv_len", "head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AttentionSpec.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"AttentionSpec.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.target not in TARGETS:
            raise ValueError(f"AttentionSpec.target must be one of {TARGETS}, got {self.target!r}")
        if self.causal and self.mask is not None:
            raise ValueError("a spec has either a mask or causal, not both")
        if self.scale is None:
            object.__setattr__(self, "scale", 1.0 / math.sqrt(self.head_dim))
        else:
            object.__setattr__(self, "scale", float(self.scale))

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group

    def shapes(self) -> dict:
        """Canonical operand shapes, by operand name."""
        b, h, g, l, s = self.batch, self.kv_heads, self.group, self.q_len, self.kv_len
        shapes = {
            "q": (b, h, g, l, self.head_dim),
            "k": (b, h, s, self.head_dim),
            "v": (b, h, s, self.v_head_dim),
            "out": (b, h, g, l, self.v_head_dim),
        }
        if self.mask is not None:
            extent = dict(zip(MASK_DIMS, (b, h, g, l, s)))
            shapes["mask"] = tuple(extent[d] for d in self.mask.dims)
        return shapes

    def operands(self) -> list:
        """The kernel's arguments in order: (name, shape, element dtype) of q, k, v, [mask], out.

        A bool mask travels as bytes ("uint8").
        """
        shapes = self.shapes()
        names = ["q", "k", "v"] + (["mask"] if self.mask is not None else []) + ["out"]
        def dtype(name):
            if name != "mask":
                return self.dtype
            return "uint8" if self.mask.dtype == "bool" else self.mask.dtype
        return [(name, shapes[name], dtype(name)) for name in names]

    def flops(self) -> float:
        """Multiply-adds of the two matmuls, times two (halved when causal with L == S)."""
        f = 2.0 * self.batch * self.q_heads * self.q_len * self.kv_len * (self.head_dim + self.v_head_dim)
        return f / 2 if self.causal and self.q_len == self.kv_len else f

    def to_json(self) -> str:
        """A stable text form: the spec part of the cache key (floats exact, via hex)."""
        data = dataclasses.asdict(self)
        data["scale"] = float(self.scale).hex()
        return json.dumps(data, sort_keys=True)

    def short_name(self) -> str:
        """A readable name for logs, dumps and kernel symbols."""
        m = "" if self.mask is None else f"_{self.mask.kind}{''.join(self.mask.dims)}"
        c = "_causal" if self.causal else ""
        return (f"b{self.batch}h{self.kv_heads}g{self.group}_l{self.q_len}s{self.kv_len}"
                f"_e{self.head_dim}v{self.v_head_dim}_{self.dtype}{m}{c}")
