"""Build the transformers model and wrap it for FSDP2 (HSDP across nodes) or DeepSpeed."""

from __future__ import annotations

import os

import torch
from torch import nn

from .config import ModelConfig


def hf_config(cfg: ModelConfig, vocab_size: int, seq_len: int):
    from transformers import LlamaConfig, MixtralConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=seq_len,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if cfg.arch == "llama":
        return LlamaConfig(**common)
    if cfg.arch == "mixtral":
        return MixtralConfig(
            num_local_experts=cfg.num_local_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            **common,
        )
    raise ValueError(f"model.arch = {cfg.arch!r}: must be llama or mixtral")


def build_model(
    cfg: ModelConfig, vocab_size: int, seq_len: int, seed: int, init_from: str | None
) -> nn.Module:
    """The same initial weights on every rank; ``init_from`` loads a merged export (PMA-init)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        hf_config(cfg, vocab_size, seq_len), attn_implementation="sdpa"
    )
    if init_from:
        donor = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(donor.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"--init-from {init_from}: weights do not fit model {cfg.arch}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    return model.float()


def shard_fsdp2(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 on one node, HSDP (shard within a node, replicate across nodes) on several."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from pma_dist.tools import fully_shard_blocks

    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world > local and world % local == 0:
        mesh = init_device_mesh(
            device.type, (world // local, local), mesh_dim_names=("replicate", "shard")
        )
    else:
        mesh = init_device_mesh(device.type, (world,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    return fully_shard_blocks(model, model.model.layers, mesh, mp_policy=policy)
