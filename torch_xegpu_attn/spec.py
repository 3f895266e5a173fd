"""AttentionSpec: what a kernel is compiled for, and the compile-cache key.

Everything that changes the compiled code lives here and nothing else does:
two calls with equal specs share one kernel.  The sequence lengths, the
batch and the number of key/value heads are *not* part of the spec: they are
run-time arguments of the kernel (the sizes of its memref arguments), so a
decoding loop whose key length grows by one each step reuses one kernel.  A
target may still cut problems into a few coarse `length_class`es when it wants
different tiles for short and long problems (the cpu target: "decode",
"short", "long").  Strides are not part of the spec either: the kernels read
their inputs through memrefs with dynamic strides (innermost stride 1).

The problem is always described in the kernel's canonical 5-D form

    q   (B, H, G, L, E)     B = product of the batch dims, H = key/value heads,
    k   (B, H, S, E)        G = query heads per key/value head (1 without GQA)
    v   (B, H, S, Ev)
    out (B, H, G, L, Ev)

where G, E and Ev are compiled in and B, H, L, S are run-time sizes
(`ProblemSize`), plus an optional mask that varies along a subset of
(b, h, g, l, s).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

#: dtypes the kernels accept, by their torch name.
DTYPES = ("float32", "float16", "bfloat16", "float64")

#: the loop dimensions of the canonical problem, in order.
MASK_DIMS = ("b", "h", "g", "l", "s")

#: The one table of targets: target name -> the torch device type whose tensors
#: it serves.  The registry (targets/) holds the implemented ones; a target in
#: this table that is not registered is planned.
TARGET_DEVICES = {"cpu": "cpu", "nvvm": "cuda", "xegpu": "xpu"}

#: what a kernel computes (AttentionSpec.kernel):
#:   "forward"      out = softmax(scores) . V, nothing else (inference)
#:   "forward_lse"  the same and each query row's log-sum-exp of its scores, what the
#:                  backward and the merge of partial results over key chunks need
#:   "backward"     dQ, dK, dV from dOut (and dLSE), recomputing the probabilities
#:                  from the saved log-sum-exp
KERNELS = ("forward", "forward_lse", "backward")
#: what the backward kernel writes
GRADIENTS = ("dq", "dk", "dv")

#: run-time extents: the symbols that stand for them in operand shapes.
RUNTIME_SYMBOLS = {"b": "B", "h": "H", "l": "L", "s": "S"}

Dim = Union[int, str]


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
        if not self.dims or tuple(d for d in MASK_DIMS if d in self.dims) != tuple(self.dims):
            raise ValueError(f"mask dims must be a non-empty ordered subset of {MASK_DIMS}, got {self.dims!r}")
        if self.kind == "bool" and self.dtype != "bool":
            raise ValueError("a bool mask has dtype 'bool'")
        if self.kind == "additive" and self.dtype not in DTYPES:
            raise ValueError(f"additive mask dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True)
class ProblemSize:
    """The run-time extents of one call: batch, key/value heads, query and key lengths."""

    batch: int
    kv_heads: int
    q_len: int
    kv_len: int

    def __post_init__(self) -> None:
        for name in ("batch", "kv_heads", "q_len", "kv_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ProblemSize.{name} must be a positive int, got {value!r}")

    def symbols(self) -> Dict[str, int]:
        return {"B": self.batch, "H": self.kv_heads, "L": self.q_len, "S": self.kv_len}


@dataclass(frozen=True)
class AttentionSpec:
    """What one kernel is compiled for; hashable, immutable, the cache key."""

    group: int
    head_dim: int
    v_head_dim: int
    dtype: str
    causal: bool = False
    scale: Optional[float] = None
    mask: Optional[MaskSpec] = None
    target: str = "cpu"
    length_class: str = "any"
    kernel: str = "forward"
    dropout_p: float = 0.0
    #: the backward's gradients (of "dq", "dk", "dv") written in the accumulator's type instead of
    #: the inputs': those the caller sums over broadcast dims, so that a 16-bit sum rounds once.
    wide_gradients: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("group", "head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AttentionSpec.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"AttentionSpec.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.target not in TARGET_DEVICES:
            raise ValueError(f"AttentionSpec.target must be one of {tuple(TARGET_DEVICES)}, got {self.target!r}")
        if self.causal and self.mask is not None:
            raise ValueError("a spec has either a mask or causal, not both")
        if not isinstance(self.dropout_p, (int, float)) or not 0.0 <= self.dropout_p <= 1.0:
            raise ValueError(f"AttentionSpec.dropout_p must be in [0, 1], got {self.dropout_p!r}")
        object.__setattr__(self, "dropout_p", float(self.dropout_p))
        if self.kernel not in KERNELS:
            raise ValueError(f"AttentionSpec.kernel must be one of {KERNELS}, got {self.kernel!r}")
        self._check_wide_gradients()
        if not isinstance(self.length_class, str) or not self.length_class:
            raise ValueError(f"AttentionSpec.length_class must be a non-empty str, got {self.length_class!r}")
        if self.scale is None:
            object.__setattr__(self, "scale", 1.0 / math.sqrt(self.head_dim))
        else:
            object.__setattr__(self, "scale", float(self.scale))

    def _check_wide_gradients(self) -> None:
        """wide_gradients as a tuple: of the backward only, of 16-bit inputs only (float32 and
        float64 gradients are in the accumulator's type already), in operand order, so that one
        kernel has one spec."""
        wide = tuple(self.wide_gradients)
        object.__setattr__(self, "wide_gradients", wide)
        if not wide:
            return
        if self.kernel != "backward":
            raise ValueError("AttentionSpec.wide_gradients is for the backward kernel")
        if self.dtype not in ("float16", "bfloat16"):
            raise ValueError(f"AttentionSpec.wide_gradients: {self.dtype} gradients are in the accumulator's "
                             f"type already")
        if tuple(n for n in GRADIENTS if n in wide) != wide:
            raise ValueError(f"AttentionSpec.wide_gradients must be a non-empty ordered subset of {GRADIENTS}, "
                             f"got {wide!r}")

    def operand_dims(self) -> Dict[str, Tuple[Dim, ...]]:
        """Canonical operand shapes, by operand name: ints are compiled in, "B", "H", "L", "S"
        are the run-time extents."""
        g, e, ev = self.group, self.head_dim, self.v_head_dim
        dims = {
            "q": ("B", "H", g, "L", e),
            "k": ("B", "H", "S", e),
            "v": ("B", "H", "S", ev),
            "out": ("B", "H", g, "L", ev),
        }
        if self.dropout_p > 0:
            dims["seed"] = (2,)
        if self.kernel != "forward":
            dims["lse"] = ("B", "H", g, "L")
        if self.kernel == "backward":
            dims.update({"dout": dims["out"], "dlse": dims["lse"], "dq": dims["q"], "dk": dims["k"],
                         "dv": dims["v"]})
        if self.mask is not None:
            extent = {"b": "B", "h": "H", "g": g, "l": "L", "s": "S"}
            dims["mask"] = tuple(extent[d] for d in self.mask.dims)
        return dims

    def operand_names(self) -> List[str]:
        """The kernel's arguments in order, by kernel:

            forward      q, k, v, [mask], [seed], out
            forward_lse  q, k, v, [mask], [seed], out, lse
            backward     q, k, v, [mask], [seed], out, lse, dout, dlse, dq, dk, dv

        Inputs first, then what the kernel writes (out and lse of the forwards; dq, dk, dv of the
        backward).  seed (two int32, with dropout) keys the dropout's generator."""
        names = ["q", "k", "v"] + (["mask"] if self.mask is not None else [])
        names += (["seed"] if self.dropout_p > 0 else []) + ["out"]
        if self.kernel != "forward":
            names.append("lse")
        if self.kernel == "backward":
            names += ["dout", "dlse", "dq", "dk", "dv"]
        return names

    def operands(self) -> List[Tuple[str, Tuple[Dim, ...], str]]:
        """The kernel's arguments in order (`operand_names`): (name, dims, element dtype).

        A bool mask travels as bytes ("uint8"); log-sum-exps (lse, dlse) and the
        `wide_gradients` are in the accumulator's type: float64 for float64 inputs, float32
        otherwise.  So is the output of the training
        kernels (forward_lse writes it, backward reads it): the backward's
        delta = rowsum(dO * O) cancels against dP = dO . V^T where a row's probabilities peak, and
        an output rounded to a 16-bit type would leave those rows' gradients mostly rounding error.
        """
        dims = self.operand_dims()

        def dtype(name):
            if name == "mask":
                return "uint8" if self.mask.dtype == "bool" else self.mask.dtype
            if (name in ("lse", "dlse") + self.wide_gradients
                    or (name == "out" and self.kernel != "forward")):
                return "float64" if self.dtype == "float64" else "float32"
            if name == "seed":
                return "int32"
            return self.dtype
        return [(name, dims[name], dtype(name)) for name in self.operand_names()]

    def writes(self) -> List[str]:
        """The operands the kernel writes, in order."""
        return {"forward": ["out"], "forward_lse": ["out", "lse"], "backward": ["dq", "dk", "dv"]}[self.kernel]

    def shapes(self, size: ProblemSize) -> Dict[str, Tuple[int, ...]]:
        """Concrete operand shapes of one problem."""
        symbols = size.symbols()
        return {name: tuple(symbols[d] if isinstance(d, str) else d for d in dims)
                for name, dims in self.operand_dims().items()}

    def flops(self, size: ProblemSize) -> float:
        """Multiply-adds of the two matmuls, times two (halved when causal with L == S)."""
        f = (2.0 * size.batch * size.kv_heads * self.group * size.q_len * size.kv_len
             * (self.head_dim + self.v_head_dim))
        return f / 2 if self.causal and size.q_len == size.kv_len else f

    def to_json(self) -> str:
        """A stable text form: the spec part of the cache key (floats exact, via hex)."""
        data = dataclasses.asdict(self)
        data["scale"] = float(self.scale).hex()
        data["dropout_p"] = float(self.dropout_p).hex()
        return json.dumps(data, sort_keys=True)

    @staticmethod
    def from_json(data: Dict) -> "AttentionSpec":
        """The spec of `to_json`'s text, parsed (json.loads) into a dict (cache listings)."""
        fields = dict(data)
        fields["scale"] = float.fromhex(fields["scale"])
        if "dropout_p" in fields:
            fields["dropout_p"] = float.fromhex(fields["dropout_p"])
        if fields.get("mask") is not None:
            mask = fields["mask"]
            fields["mask"] = MaskSpec(mask["kind"], tuple(mask["dims"]), mask["dtype"])
        if "wide_gradients" in fields:
            fields["wide_gradients"] = tuple(fields["wide_gradients"])
        return AttentionSpec(**fields)

    def short_name(self) -> str:
        """A readable name for logs, dumps and kernel symbols."""
        m = "" if self.mask is None else f"_{self.mask.kind}{''.join(self.mask.dims)}"
        c = "_causal" if self.causal else ""
        kind = "" if self.kernel == "forward" else f"_{self.kernel}"
        kind += f"_dropout{self.dropout_p:g}" if self.dropout_p > 0 else ""
        kind += f"_wide{''.join(n[1] for n in self.wide_gradients)}" if self.wide_gradients else ""
        return (f"g{self.group}_e{self.head_dim}v{self.v_head_dim}_{self.dtype}{m}{c}"
                f"_{self.length_class}{kind}")
