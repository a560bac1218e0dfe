"""Megatron-Core's GPT parameter names and layouts as Hugging Face Llama's: the map a merge
takes to become a ``LlamaForCausalLM`` checkpoint.

A Llama-equivalent ``GPTModel`` (``TransformerConfig(normalization="RMSNorm",
gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False)``,
``position_embedding_type="rope"``, ``share_embeddings_and_output_weights=False``) holds the
same weights as ``LlamaConfig(hidden_size, intermediate_size=ffn_hidden_size,
num_attention_heads, num_key_value_heads=num_query_groups, head_dim=kv_channels,
rms_norm_eps=layernorm_epsilon, rope_theta=rotary_base, tie_word_embeddings=False)``, in other
tensors: ``linear_qkv`` fuses the query, key and value projections per query group (each
group's query heads, then its key head, then its value head, along the rows), and
``linear_fc1`` the gate and up projections (gate first). Both the local spec's names
(``input_layernorm``, ``pre_mlp_layernorm``) and the Transformer Engine spec's
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``, which GPU runs have) map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_WHOLE = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_IN_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


@dataclass(frozen=True)
class LlamaLayout:
    """The attention geometry the fused tensors are split by."""

    heads: int
    """``num_attention_heads``."""
    groups: int
    """``num_query_groups`` (key and value heads)."""
    head_dim: int
    """``kv_channels``."""

    @classmethod
    def of(cls, config) -> LlamaLayout:
        """From a Megatron ``TransformerConfig`` (or anything with its three fields)."""
        groups = config.num_query_groups or config.num_attention_heads
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        return cls(config.num_attention_heads, groups, head_dim)

    def convert(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Llama tensors of the Megatron tensor ``name`` (meta tensors too)."""
        if name in _WHOLE:
            return {_WHOLE[name]: tensor}
        match = _LAYER.fullmatch(name)
        if match is None:
            raise ValueError(f"{name!r} has no Llama counterpart (not a Llama-equivalent GPTModel)")
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _IN_LAYER:
            return {prefix + _IN_LAYER[rest]: tensor}
        if rest == "self_attention.linear_qkv.weight":
            per_group = self.heads // self.groups
            rows = tensor.view(self.groups, per_group + 2, self.head_dim, tensor.shape[-1])
            q, k, v = rows.split([per_group, 1, 1], dim=1)
            return {
                prefix + "self_attn.q_proj.weight": q.reshape(-1, tensor.shape[-1]),
                prefix + "self_attn.k_proj.weight": k.reshape(-1, tensor.shape[-1]),
                prefix + "self_attn.v_proj.weight": v.reshape(-1, tensor.shape[-1]),
            }
        if rest == "mlp.linear_fc1.weight":
            gate, up = tensor.chunk(2, dim=0)
            return {prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up}
        raise ValueError(f"{name!r} has no Llama counterpart (not a Llama-equivalent GPTModel)")
