"""Test-only: Megatron-Core's model, DDP and distributed optimizer on CPU gloo ranks.

Megatron places tensors on CUDA by name (``device="cuda"``, ``torch.cuda.current_device()``,
which is ``"cpu"`` here, also in backward passes, which run outside the function mode;
``.cuda()``), checks parameter kinds by their CUDA type names, and seeds a CUDA generator. For
the duration of :func:`megatron_on_cpu` these placements land on the CPU and those names are
the CUDA ones (and the MoE router's Transformer Engine GEMM, which 0.16 names only where TE
imports, is None: absent, as it is); Megatron's own logic (layouts, ranges, the optimizer's
step, checkpoints) runs unchanged. The library never imports this module: it is how the
tests run Megatron where there is no GPU.

:func:`build` makes the tiny GPT model of the tests (a local-spec ``GPTModel`` whose
parameters' sizes do not divide by the world size), its Megatron DDP wrapper and optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tests.support.fragments import assembled as assembled_fragments

VOCAB = 37
SEQUENCE = 8


def _is_cuda(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """``device="cuda"`` (or a device index) as ``"cpu"``; ``.cuda()`` and ``.to("cuda")``
    return the tensor where it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_TYPE = torch.Tensor.type


def _cuda_type_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    if args or kwargs:
        return _TYPE(self, *args, **kwargs)
    name = _TYPE(self)
    return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Megatron's CUDA placements on the CPU for the body, put back after it."""
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.moe import moe_utils

    saved: list[tuple[Any, str, Any]] = []
    missing = object()

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name, missing)))
        setattr(owner, name, value)

    patch(torch.Tensor, "type", _cuda_type_name)
    patch(torch.cuda, "current_device", lambda: "cpu")
    patch(torch.cuda, "synchronize", lambda *_, **__: None)
    patch(torch.cuda, "empty_cache", lambda *_, **__: None)
    patch(torch.cuda, "get_rng_state", lambda *_, **__: torch.get_rng_state())
    patch(torch.cuda, "manual_seed", torch.manual_seed)
    set_state = lambda state, *_, **__: torch.set_rng_state(state)  # noqa: E731
    patch(megatron_random, "_set_cuda_rng_state", set_state)
    patch(megatron_random, "_get_cuda_rng_state", lambda *_, **__: torch.get_rng_state())
    if not hasattr(moe_utils, "te_general_gemm"):  # 0.16 names it only where TE imports
        patch(moe_utils, "te_general_gemm", None)
    try:
        with _CudaToCpu():
            yield
    finally:
        for owner, name, value in reversed(saved):
            if value is missing:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


@dataclass
class Run:
    """A Megatron model chunk (DDP-wrapped), its optimizer and how to train it a step."""

    model: Any
    optimizer: Any

    def train_step(self, step: int, rank: int | Sequence[int], overflow: bool = False) -> bool:
        """One step on the batch of step ``step`` of data-parallel rank ``rank`` (several: their
        batches together, as one rank trains what they did; with ``overflow``, an Inf
        gradient); whether Megatron updated the parameters."""
        ranks = [rank] if isinstance(rank, int) else list(rank)
        seeds = [torch.Generator().manual_seed(1000 * step + r) for r in ranks]
        tokens = torch.cat([torch.randint(0, VOCAB, (2, SEQUENCE + 1), generator=g) for g in seeds])
        positions = torch.arange(SEQUENCE).expand(len(tokens), SEQUENCE)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self.model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
        scale = self.optimizer.get_loss_scale() if hasattr(self.optimizer, "get_loss_scale") else 1
        (loss * scale).backward()
        self.model.finish_grad_sync()
        if overflow:
            next(self.model.parameters()).main_grad.view(-1)[0] = float("inf")
        return self.optimizer.step()[0]

    def forward(self) -> torch.Tensor:
        """Logits of a fixed batch (:func:`run_tokens`)."""
        with torch.no_grad():
            return self.model(run_tokens(), torch.arange(SEQUENCE).expand(2, SEQUENCE), None)


def run_tokens() -> torch.Tensor:
    """The fixed batch :meth:`Run.forward` reads."""
    return (torch.arange(2 * SEQUENCE) * 7).remainder(VOCAB).view(2, SEQUENCE)


def build(
    dtype: str,
    seed: int = 0,
    lr: float = 1e-2,
    distributed: bool = True,
    experts: int = 0,
    tensor_parallel: int = 1,
    gated: bool = False,
    vocab: int = VOCAB,
    llama: bool = False,
) -> Run:
    """A 2-layer GPT (hidden 24, ffn 96, vocabulary 37: sizes that do not divide by 2 or 4 ranks
    evenly across bucket shards) in ``dtype`` (fp32, bf16 or fp16), with ``experts`` MoE
    experts of ffn 40 (top-2, no biases) if any, a gated (SwiGLU) MLP if ``gated``, sliced over
    ``tensor_parallel`` ranks (``vocab`` divisible by them), Llama-equivalent if ``llama``
    (:data:`LLAMA`: RMSNorm, SwiGLU, rotary positions, no biases, 2 key-value heads for 4
    query heads; :func:`llama_config` is its ``LlamaConfig``), under Megatron's DDP and its
    distributed optimizer (or, without ``distributed``, its plain one). Call inside
    :func:`megatron_on_cpu` after ``torch.distributed`` is up; it (re)builds the model-parallel
    groups."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_parallel, 1)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    half = {"bf16": dtype == "bf16", "fp16": dtype == "fp16"}
    params_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    moe = {
        "num_moe_experts": experts, "moe_router_topk": 2, "moe_ffn_hidden_size": 40,
        "moe_token_dispatcher_type": "allgather", "moe_aux_loss_coeff": 0.0,
        "add_bias_linear": False,
    } if experts else {}  # fmt: skip
    config = TransformerConfig(
        num_layers=2, hidden_size=24, num_attention_heads=4, ffn_hidden_size=96,
        use_cpu_initialization=True, params_dtype=params_dtype, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=tensor_parallel, **half, **moe,
        **({"gated_linear_unit": True, "activation_func": F.silu} if gated else {}),
        **(LLAMA if llama else {}),
    )  # fmt: skip
    layers = get_gpt_layer_local_spec(
        num_experts=experts or None, moe_grouped_gemm=False,
        normalization=config.normalization,
    )  # fmt: skip
    rope = {"position_embedding_type": "rope"} if llama else {}
    gpt = GPTModel(config, layers, vocab_size=vocab, max_sequence_length=16, **rope)
    if dtype != "fp32":  # as Megatron's get_model wraps a half-precision model
        gpt = Float16Module(config, gpt)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed, grad_reduce_in_fp32=True
    )
    model = DistributedDataParallel(config, ddp_config, gpt)
    scaling = {"initial_loss_scale": 128.0} if dtype == "fp16" else {}  # no overflow at 2^32
    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=lr, use_distributed_optimizer=distributed, **half, **scaling
    )
    return Run(model, get_megatron_optimizer(optimizer_config, [model]))


LLAMA = {
    "normalization": "RMSNorm", "gated_linear_unit": True, "activation_func": F.silu,
    "add_bias_linear": False, "num_query_groups": 2,
}  # fmt: skip
"""What makes :func:`build`'s GPT Llama-equivalent (with rotary positions)."""


def llama_config(vocab: int = VOCAB) -> Any:
    """The ``LlamaConfig`` of :func:`build`'s Llama-equivalent GPT."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=24, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=6, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=16, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False,
    )  # fmt: skip


def teardown() -> None:
    """Megatron's model-parallel groups down (before ``destroy_process_group``)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def assembled(merger: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full float32 parameters from each rank's ``tensors`` (keyed like ``merger.names``, shaped
    like its shards: ``merger.merged_shards()``, or the live mains), all ranks gathered
    (:func:`tests.support.fragments.assembled`; tensor-parallel ranks hold the norms whole)."""
    return assembled_fragments(merger.backend.shards(), tensors)


def save_checkpoint(run: Run, directory: str, sharding: str = "fully_reshardable") -> None:
    """The model and optimizer as Megatron-LM saves them: ``dist_checkpointing.save`` of their
    sharded state dicts (the optimizer's mains laid out per parameter, ``fully_reshardable``).
    Collective."""
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(directory)
    dist.barrier()
    model = run.model.sharded_state_dict()
    metadata = {"distrib_optim_sharding_type": sharding}
    optimizer = run.optimizer.sharded_state_dict(model, metadata=metadata)
    dist_checkpointing.save({"model": model, "optimizer": optimizer}, directory)


def load_checkpoint(run: Run, directory: str, sharding: str = "fully_reshardable") -> None:
    """The model and optimizer from :func:`save_checkpoint`'s files, as Megatron-LM loads them
    (at another data-parallel size too). Collective.

    Torch's Adam, Megatron's optimizer where neither Transformer Engine nor Apex is (the CPU),
    counts steps per parameter, and Megatron 0.16 restores only its groups' count (the one its
    GPU optimizers read): each parameter's count is set from its group (a tensor of its own,
    as Adam counts in place), or the resumed bias correction would be the dummy states'."""
    from megatron.core import dist_checkpointing

    for inner in run.optimizer.chained_optimizers:  # states to load into, as Megatron-LM has
        inner._init_optimizer_states_with_dummy_values()
    model = run.model.sharded_state_dict()
    metadata = {"distrib_optim_sharding_type": sharding}
    optimizer = run.optimizer.sharded_state_dict(model, is_loading=True, metadata=metadata)
    state = dist_checkpointing.load({"model": model, "optimizer": optimizer}, directory)
    run.model.load_state_dict({k.removeprefix("module."): v for k, v in state["model"].items()})
    with torch.no_grad():  # fp32 mains are views of the parameters
        run.optimizer.load_state_dict(state["optimizer"])
    for inner in run.optimizer.chained_optimizers:
        adam = inner.optimizer
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                state["step"] = torch.full_like(state["step"], group["step"])  # one each


def checkpoint_mains(directory: str) -> dict[str, torch.Tensor]:
    """The fp32 main weights a checkpoint of :func:`save_checkpoint` holds, read back by
    Megatron's ``load_plain_tensors``, under the model's parameter names (the decoder's layers
    and a layer's experts, which Megatron saves stacked, one by one; the norms under the names
    the local spec's modules have). Collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    renamed = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    prefix = "optimizer.state.param."
    out = {}
    for key, value in dist_checkpointing.load_plain_tensors(directory).items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :].removeprefix("module.")
        if name.startswith("decoder.layers."):
            rest = name[len("decoder.layers.") :]
            for module_key, saved_key in renamed.items():  # the local spec's norms
                if rest.startswith(saved_key):
                    rest = module_key + rest[len(saved_key) :]
            for i, layer in enumerate(value):
                if rest.startswith(STACKED_EXPERTS):  # and the experts of a layer
                    tail = rest[len(STACKED_EXPERTS) :]
                    for e, expert in enumerate(layer):
                        out[f"decoder.layers.{i}.mlp.experts.local_experts.{e}.{tail}"] = expert
                else:
                    out[f"decoder.layers.{i}.{rest}"] = layer
        else:
            out[name] = value
    return out


STACKED_EXPERTS = "mlp.experts.experts."
"""Where Megatron's checkpoints stack a layer's ``SequentialMLP`` experts."""
