"""Hugging Face transformers: the op as an attention implementation named "xegpu".

    import torch_xegpu_attn
    torch_xegpu_attn.register_transformers()      # imports transformers, registers "xegpu"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="xegpu")
    model.set_attn_implementation("xegpu")        # or switch a loaded model

`register` adds the implementation through transformers' public registries:
`AttentionInterface.register("xegpu", attention_forward)` (what a model's
attention layers call) and `AttentionMaskInterface.register("xegpu",
sdpa_mask)` (how the model builds its masks: transformers' own SDPA masks,
boolean with True = attend, shape (batch, 1, q_len, kv_len), or None when the
attention is purely causal, which is the convention of the op too).

`attention_forward` follows the calling convention transformers documents for
attention functions: query (batch, heads, q_len, head_dim), key and value
(batch, kv_heads, kv_len, head_dim) as the KV cache returns them (grouped
query attention is passed with `enable_gqa`, never by repeating K and V),
returning (batch, q_len, heads, head_dim) and no attention weights.  What it
does not support raises instead of falling back: attention weights
(`output_attentions=True`), logit soft-capping, attention sinks.

transformers is an optional dependency (the package's `transformers` extra):
nothing here is imported by `import torch_xegpu_attn`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

#: the name models select with attn_implementation=...
NAME = "xegpu"


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      position_bias: Optional[torch.Tensor] = None, **kwargs) -> Tuple[torch.Tensor, None]:
    """One attention layer of a transformers model through torch_xegpu_attn.attention."""
    from . import attention

    _reject_unsupported(kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, :kv_len]  # a static cache's mask may be longer
    # transformers' convention: no mask and more than one query means causal (for a module
    # that declares itself causal); one query attends to every cached key.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and q_len > 1 and attention_mask is None
    if causal and kv_len > q_len:
        # Prefill into an empty static cache: the keys past the prompt are empty slots that
        # top-left causal attention never sees; leave them out.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = _with_position_bias(position_bias, attention_mask, causal, query, key)
        causal = False
    out = attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal,
                    scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _reject_unsupported(kwargs) -> None:
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='xegpu' returns no attention weights; load the model with "
                         "attn_implementation='eager' for output_attentions=True")
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='xegpu' does not support logit soft-capping (softcap); "
                         "use attn_implementation='eager'")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("attn_implementation='xegpu' does not support attention sinks; "
                         "use attn_implementation='eager'")


def _with_position_bias(bias: torch.Tensor, mask: Optional[torch.Tensor], causal: bool, query: torch.Tensor,
                        key: torch.Tensor) -> torch.Tensor:
    """A position bias (T5-style, added to the scores) as one additive mask: the bias where a key
    is visible, -inf where the boolean or causal mask hides it, or bias + mask for an additive mask."""
    if mask is not None and mask.dtype != torch.bool:
        return (bias + mask).contiguous()
    visible = mask
    if causal:
        rows = torch.arange(query.shape[2], device=query.device)[:, None]
        visible = rows >= torch.arange(key.shape[2], device=query.device)[None, :]
    if visible is None:
        return bias.contiguous()
    return bias.masked_fill(~visible, float("-inf")).contiguous()


def register() -> str:
    """Register "xegpu" in transformers' attention and attention-mask registries; returns the name.

    Raises ImportError with what to install when transformers is missing.
    """
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError as error:
        raise ImportError("torch_xegpu_attn.register_transformers() needs Hugging Face transformers: "
                          "pip install 'torch-xegpu-attn[transformers]'") from error
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
