"""Tiny transformers models (Llama dense, Mixtral MoE with grouped experts, DeepSeek-V3 MoE with
an expert-bias buffer) built offline."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, SEQ, BATCH = 96, 16, 4


def hf_config(kind: str):
    """A config whose sizes do not divide by 2 or 4, so FSDP2 shards are uneven."""
    from transformers import DeepseekV3Config, LlamaConfig, MixtralConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "llama":
        return LlamaConfig(intermediate_size=88, tie_word_embeddings=True, **common)
    if kind == "mixtral":
        return MixtralConfig(
            intermediate_size=40,
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
            **common,
        )
    if kind == "deepseek_v3":
        common.update(num_key_value_heads=4)
        return DeepseekV3Config(
            intermediate_size=88,
            moe_intermediate_size=20,
            n_shared_experts=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=12,
            v_head_dim=12,
            **common,
        )
    raise ValueError(kind)


def make_hf_model(kind: str, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config(kind), attn_implementation="eager").float()


def shard_hf_fsdp2(model: nn.Module, world_size: int) -> nn.Module:
    from pma_dist.testing import shard_blocks

    return shard_blocks(model, model.model.layers, world_size)


def hf_batch(step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(5000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH * 2, SEQ), generator=g)
    per_rank = tokens.shape[0] // world_size
    return tokens[rank * per_rank : (rank + 1) * per_rank]


def hf_train_step(model: nn.Module, optimizer, step: int, rank: int, world_size: int) -> float:
    tokens = hf_batch(step, rank, world_size)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


class TokenDataset(torch.utils.data.Dataset):
    """``length`` fixed random sequences of ``SEQ`` tokens, each its own labels: the
    ``train_dataset``/``eval_dataset`` of a transformers ``Trainer``."""

    def __init__(self, length: int, seed: int = 7000) -> None:
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + index)
        tokens = torch.randint(0, VOCAB, (SEQ,), generator=g)
        return {"input_ids": tokens, "labels": tokens.clone()}
