"""Megatron-Core (its GPTModel, DDP and distributed optimizer) on 2 CPU gloo ranks, fp32 and bf16:
PMA over the fp32 main shards, against the offline average of Megatron's own checkpoints.

The references are the mains Megatron saves with ``dist_checkpointing`` after every step, read
back by its ``load_plain_tensors`` and merged in float64; the CUDA placements are shimmed for
the CPU by ``tests/support/megatron_cpu`` (test-only)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from pma_dist import PMAConfig  # noqa: E402
from pma_dist.backends import canonical_name  # noqa: E402
from pma_dist.testing import (  # noqa: E402
    assert_bitwise_equal,
    assert_close_rel,
    reference_weights,
    run_ranks,
    window_reference,
)
from tests.support.megatron_cpu import (  # noqa: E402
    assembled,
    build,
    checkpoint_mains,
    llama_config,
    megatron_on_cpu,
    run_tokens,
    save_checkpoint,
    teardown,
)

WINDOW, STEPS = 4, 6
MERGES = {
    "sma": {}, "wma": {}, "ema": {}, "cosine": {}, "minus_sqrt": {},
    "weights": {"weights": [0.1, 0.2, 0.3, 0.4]},
}  # fmt: skip
RUNS = {
    "fp32": {},
    "bf16": {},
    "moe": {"experts": 4},
    "tp": {"tensor_parallel": 2, "gated": True, "vocab": 38},
}
"""Per run: ``build``'s options beside the dtype (``moe``: fp32 with 4 experts a layer; ``tp``:
fp32 and SwiGLU, sliced over the 2 ranks; resumed at 1 rank, whole)."""
DTYPE = {"bf16": "bf16"}
"""The dtype of a run (fp32 where not named)."""
PMA = {"window": WINDOW, "interval_steps": 1, "ema_alpha": 0.3}


def _mains(merger) -> dict[str, torch.Tensor]:
    return {s.name: s.local.detach().clone() for s in merger.backend.shards() if not s.buffer}


def _model_state(run) -> dict[str, torch.Tensor]:
    """The model's parameters (every rank holds them whole), under their canonical names."""
    return {canonical_name(n): p.detach().clone() for n, p in run.model.named_parameters()}


def _train_worker(rank: int, world_size: int, root: str) -> dict:
    """Per run: train, save a Megatron checkpoint after every step, merge every way, swap
    (forward changes, originals back bitwise), save PMA's per-rank files."""
    from pma_dist.integrations.megatron import attach, detach, export_checkpoint

    out = {}
    with megatron_on_cpu():
        for kind, options in RUNS.items():
            run = build(DTYPE.get(kind, "fp32"), seed=3, **options)
            merger = attach(run.model, run.optimizer, PMAConfig(**PMA))
            for step in range(STEPS):
                assert run.train_step(step, rank)
                save_checkpoint(run, f"{root}/{kind}/step{step}")
            merges = {
                key: assembled(merger, merger.merged_shards(**(options or {"method": key})))
                for key, options in MERGES.items()
            }
            before, mains, logits = _model_state(run), _mains(merger), run.forward()
            with merger.swapped("sma"):
                swapped_logits = run.forward()
                swapped_mains = assembled(merger, _mains(merger))
                pushed = _model_state(run)
            for name, value in pushed.items():  # every rank holds all of each (or its slice)
                expected = merges["sma"][name].to(value.dtype)
                if expected.shape == value.shape:
                    assert torch.equal(value, expected), f"{kind}: {name} is not the merge"
            assert_bitwise_equal(_model_state(run), before, f"{kind} model after the swap")
            assert_bitwise_equal(_mains(merger), mains, f"{kind} mains after the swap")
            assert torch.equal(run.forward(), logits), f"{kind}: the forward came back changed"
            assert not torch.equal(swapped_logits, logits), f"{kind}: the swap changed nothing"
            merger.save(f"{root}/{kind}/pma")
            export_checkpoint(merger, f"{root}/{kind}/export", "sma")
            steps = merger.num_snapshots
            detach(merger)
            run.train_step(STEPS, rank)
            assert merger.num_snapshots == steps, "a detached Merger was stepped"
            out[kind] = {"merges": merges, "swapped": swapped_mains}
        teardown()
    return out


def _resume_worker(rank: int, world_size: int, root: str) -> dict:
    """At another data-parallel size: read Megatron's checkpoints offline, load the exported
    merge into a fresh model as Megatron loads a checkpoint, load PMA's files."""
    from megatron.core import dist_checkpointing

    from pma_dist.integrations.megatron import attach

    out = {}
    with megatron_on_cpu():
        for kind, options in RUNS.items():
            snapshots = [checkpoint_mains(f"{root}/{kind}/step{s}") for s in range(STEPS)]
            whole = {k: v for k, v in options.items() if k != "tensor_parallel"}
            run = build(DTYPE.get(kind, "fp32"), seed=9, **whole)
            gpt = run.model.module.module if kind == "bf16" else run.model.module  # GPTModel
            loaded = dist_checkpointing.load(gpt.sharded_state_dict(), f"{root}/{kind}/export")
            gpt.load_state_dict(loaded)
            exported = _model_state(run)
            merger = attach(run.model, run.optimizer, PMAConfig(**PMA))
            merger.load(f"{root}/{kind}/pma")
            merges = {
                key: assembled(merger, merger.merged_shards(**(options or {"method": key})))
                for key, options in MERGES.items()
            }
            out[kind] = {"snapshots": snapshots, "merges": merges, "exported": exported}
        teardown()
    return out


def test_megatron_merges_equal_the_offline_average_of_its_checkpoints(tmp_path: Path) -> None:
    """SMA, WMA, EMA, decay-shaped merges and explicit weights over a window of the fp32 mains
    equal (within float32 rounding) the float64 average of the mains in Megatron's own
    checkpoints, for fp32, bf16 and MoE models, on 2 ranks whose shards cut parameters; a swap
    shows the merge to the forward and puts the model and mains back bitwise; the per-rank
    state resumes at 1 rank bitwise; the merge exported as a Megatron checkpoint loads into a
    fresh model at 1 rank (tensor parallelism 2 -> 1 too) as the merge."""
    trained = run_ranks(_train_worker, 2, str(tmp_path), timeout=600)[0]
    resumed = run_ranks(_resume_worker, 1, str(tmp_path), timeout=300)[0]
    for kind in RUNS:
        snapshots = resumed[kind]["snapshots"]
        for key, options in MERGES.items():
            weights = options.get("weights")
            if key in ("cosine", "minus_sqrt"):  # decay-shaped: their weights
                weights = reference_weights(key, WINDOW)
            method = key if key in ("sma", "wma", "ema") else "sma"
            expected = window_reference(snapshots, WINDOW, method, PMA["ema_alpha"], weights)
            merged = trained[kind]["merges"][key]
            assert set(merged) == set(expected), f"{kind}: names differ"
            assert_close_rel(merged, expected, 1e-6, f"{kind} {key}")
            assert_bitwise_equal(resumed[kind]["merges"][key], merged, f"{kind} {key} at 1 rank")
        assert_bitwise_equal(trained[kind]["swapped"], trained[kind]["merges"]["sma"], "swap")
        exported = resumed[kind]["exported"]
        assert set(exported) == set(expected), f"{kind}: the export holds other parameters"
        for name, value in exported.items():  # the merge, in the model's dtype, at 1 rank
            merged = trained[kind]["merges"]["sma"][name].to(value.dtype)
            assert torch.equal(value, merged), f"{kind}: exported {name} is not the merge"


def _refusal_worker(rank: int, world_size: int) -> dict:
    """A step Megatron skips takes no snapshot; what the backend cannot average is refused."""
    from pma_dist.integrations.megatron import attach, detach

    out = {}
    with megatron_on_cpu():
        run = build("fp16", seed=1)
        merger = attach(run.model, run.optimizer, PMAConfig(window=3, interval_steps=1))
        taken = [(run.train_step(s, rank, overflow=s == 1), merger.num_snapshots) for s in range(3)]
        out["skip"] = taken
        out["steps"] = merger.schedule.steps_seen
        config = PMAConfig(window=3, interval_steps=1)
        sgd = torch.optim.SGD(run.model.parameters())
        for what, call in {
            "plain optimizer": lambda: attach(*_pair(build("bf16", distributed=False)), config),
            "two chunks": lambda: attach([run.model, run.model], run.optimizer, config),
            "torch optimizer": lambda: attach(run.model, sgd, config),
            "twice": lambda: attach(run.model, run.optimizer, config),
            "no config": lambda: attach(run.model, run.optimizer),
        }.items():
            try:
                call()
                out[what] = None
            except (ValueError, TypeError, RuntimeError) as err:
                out[what] = str(err)
        detach(merger)
        inner = run.optimizer.chained_optimizers[0]
        for owner, flag in (
            (inner.config, "use_precision_aware_optimizer"),
            (inner.config, "optimizer_cpu_offload"),
            (inner.config, "overlap_param_gather_with_optimizer_step"),
            (inner.ddp_config, "use_megatron_fsdp"),
        ):  # the settings as the backend reads them from a built optimizer
            setattr(owner, flag, True)
            try:
                attach(run.model, run.optimizer, config)
                out[flag] = None
            except ValueError as err:
                out[flag] = str(err)
            setattr(owner, flag, False)
        teardown()
    return out


def _pair(run) -> tuple:
    return run.model, run.optimizer


def test_skipped_steps_take_no_snapshot_and_unsupported_setups_are_refused() -> None:
    result = run_ranks(_refusal_worker, 1, timeout=300)[0]
    assert result["skip"] == [(True, 1), (False, 1), (True, 2)], result["skip"]
    assert result["steps"] == 2, "a skipped step was counted"
    assert "use_distributed_optimizer=True" in result["plain optimizer"]
    assert "virtual pipeline" in result["two chunks"]
    assert "get_megatron_optimizer" in result["torch optimizer"]
    assert "already wrapped" in result["twice"]
    assert "megatron.attach: config is required" in result["no config"]
    for flag in (
        "use_precision_aware_optimizer", "optimizer_cpu_offload",
        "overlap_param_gather_with_optimizer_step", "use_megatron_fsdp",
    ):  # fmt: skip
        assert f"{flag} = True is not supported" in result[flag], result[flag]


def test_megatron_versions_outside_the_tested_range_are_refused() -> None:
    from pma_dist.backends._megatron_probe import check_version

    check_version("0.16.1")
    for version in ("0.15.2", "0.17.0", "1.0", "nightly"):
        with pytest.raises(RuntimeError, match=r"megatron-core>=0\.16,<0\.17"):
            check_version(version)


@pytest.mark.parametrize(
    ("shape", "dim", "chunks"), [((6, 5), 0, 1), ((6, 4), 1, 1), ((8, 3), 0, 2), ((3, 4, 6), 1, 1)]
)
def test_tensor_parallel_slices_map_to_the_whole_parameter(shape, dim, chunks) -> None:
    """Each run a slice reports holds the whole parameter's elements at the offsets given, for
    every range of the slice: column- and row-parallel slices, and a gated ``linear_fc1``
    whose gate and up halves are each sliced (Megatron's layout of the whole)."""
    from pma_dist.backends._megatron import SliceLayout

    size = 2
    whole = torch.arange(math.prod(shape), dtype=torch.float64).view(shape)
    halves = whole.chunk(chunks, dim)
    for rank in range(size):
        local = torch.cat([half.chunk(size, dim)[rank] for half in halves], dim).reshape(-1)
        local_shape = list(shape)
        local_shape[dim] //= size
        layout = SliceLayout(tuple(local_shape), dim, rank, size, chunks)
        assert layout.global_shape == shape
        for lo, hi in ((0, local.numel()), (1, local.numel() - 2), (3, 4), (5, 5)):
            covered = 0
            for start, numel, at in layout.runs(lo, hi):
                assert at == lo + covered, "runs out of order or with gaps"
                assert torch.equal(whole.view(-1)[start : start + numel], local[at : at + numel])
                covered += numel
            assert covered == hi - lo


def _llama_worker(rank: int, world_size: int, root: str) -> dict:
    """A Llama-equivalent GPT trained with PMA, its merge exported as a Hugging Face Llama, and
    Megatron's forward of the merge to compare with."""
    from pma_dist.integrations.megatron import attach

    with megatron_on_cpu():
        run = build("fp32", seed=5, llama=True)
        merger = attach(run.model, run.optimizer, PMAConfig(**PMA))
        for step in range(STEPS):
            assert run.train_step(step, rank)
        merger.export(f"{root}/hf", method="sma", config=llama_config())
        with merger.swapped("sma"):
            logits = run.forward()
        teardown()
    return {"logits": logits, "tokens": run_tokens()}


def test_the_merge_of_a_llama_equivalent_gpt_exports_as_a_hugging_face_llama(tmp_path) -> None:
    """The merge of 2 ranks' fp32 mains exported in Llama's names and layout (q/k/v split per
    query group from ``linear_qkv``, gate/up from ``linear_fc1``) loads in transformers with
    logits equal to Megatron's forward of the merged weights within 1e-4 relative."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    result = run_ranks(_llama_worker, 2, str(tmp_path), timeout=300)[0]
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    saved = {}
    for file in (tmp_path / "hf").glob("*.safetensors"):
        saved.update(load_file(file))
    assert set(saved) == set(hf.state_dict()), set(saved) ^ set(hf.state_dict())
    with torch.no_grad():
        logits = hf(result["tokens"]).logits
    error = float((logits - result["logits"]).norm() / result["logits"].norm())
    assert error < 1e-4, f"transformers' logits differ from Megatron's by {error:.2e}"


@pytest.mark.parametrize("spec", ["local", "transformer_engine"])
def test_megatron_names_map_to_llama_names(spec: str) -> None:
    """Both specs' norm names, and the fused tensors split by the attention geometry."""
    from pma_dist.backends._megatron_names import LlamaLayout

    layout = LlamaLayout(heads=4, groups=2, head_dim=3)
    norms = {
        "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
        "transformer_engine": (
            "self_attention.linear_qkv.layer_norm_weight",
            "mlp.linear_fc1.layer_norm_weight",
        ),
    }[spec]
    assert set(layout.convert(f"decoder.layers.3.{norms[0]}", torch.ones(5))) == {
        "model.layers.3.input_layernorm.weight"
    }
    assert set(layout.convert(f"decoder.layers.3.{norms[1]}", torch.ones(5))) == {
        "model.layers.3.post_attention_layernorm.weight"
    }
    rows = torch.arange(2 * (2 + 2) * 3).float().unsqueeze(1)  # group g: q q k v, 3 rows each
    split = layout.convert("decoder.layers.0.self_attention.linear_qkv.weight", rows)
    q, k, v = (split[f"model.layers.0.self_attn.{x}_proj.weight"].view(-1) for x in "qkv")
    assert q.tolist() == [*range(0, 6), *range(12, 18)]
    assert k.tolist() == [*range(6, 9), *range(18, 21)]
    assert v.tolist() == [*range(9, 12), *range(21, 24)]
    with pytest.raises(ValueError, match="no Llama counterpart"):
        layout.convert("decoder.layers.0.mlp.router.weight", torch.ones(2, 2))


def _checkpoint_worker(rank: int, world_size: int, root: str, mode: str) -> dict:
    """``save``: 2 ranks train 3 steps and save Megatron's checkpoint with the average in it.
    ``resume``: 1 rank refuses a corrupted copy before Megatron loads anything, then loads
    Megatron's model and optimizer and the average, as Megatron-LM resumes. Both then train 2
    more steps on the same global batches."""
    from pma_dist.errors import PMAStateError
    from pma_dist.integrations import megatron as pma_megatron
    from tests.support.megatron_cpu import load_checkpoint

    out = {}
    with megatron_on_cpu():
        run = build("fp32", seed=3 if mode == "save" else 9)
        merger = pma_megatron.attach(run.model, run.optimizer, PMAConfig(**PMA))
        checkpoint = f"{root}/iter_0000003"
        if mode == "save":
            for step in range(3):
                assert run.train_step(step, rank)
            save_checkpoint(run, checkpoint, "dp_reshardable")
            pma_megatron.save_checkpoint(merger, checkpoint, 3)
        else:
            try:
                pma_megatron.check_checkpoint(merger, f"{root}/corrupt", 3)
            except PMAStateError as err:
                out["corrupt"] = str(err)
            out["fresh"] = pma_megatron.load_checkpoint(merger, checkpoint, 3, fresh=True)
            out["missing"] = pma_megatron.load_checkpoint(merger, checkpoint, 4)
            assert pma_megatron.check_checkpoint(merger, checkpoint, 3)
            load_checkpoint(run, checkpoint, "dp_reshardable")
            assert pma_megatron.load_checkpoint(merger, checkpoint, 3)
        out["merges"] = {m: assembled(merger, merger.merged_shards(m)) for m in ("sma", "wma")}
        out["history"] = merger.history
        for step in (3, 4):  # on, uninterrupted at 2 ranks; at 1, on both ranks' batches
            assert run.train_step(step, rank if mode == "save" else (0, 1))
        out["continued"] = {m: assembled(merger, merger.merged_shards(m)) for m in ("sma", "wma")}
        out["mains"] = assembled(merger, _mains(merger))
        teardown()
    return out


def test_the_average_rides_in_megatrons_checkpoint_and_resumes_at_another_size(
    tmp_path: Path,
) -> None:
    """Saved inside Megatron's checkpoint at 2 data-parallel ranks and resumed with it at 1,
    the average is the saved one bit for bit, and 2 steps on it merges as the uninterrupted
    2-rank run does (within the rounding of one rank's gradient sum against two); a corrupted
    copy is refused before Megatron loads anything; fresh=True and a checkpoint without an
    average of that iteration start afresh."""
    import shutil

    saved = run_ranks(_checkpoint_worker, 2, str(tmp_path), "save", timeout=300)[0]
    files = tmp_path / "iter_0000003" / "pma_iter_0000003"
    corrupt = tmp_path / "corrupt" / "pma_iter_0000003"
    shutil.copytree(files, corrupt)
    victim = max(corrupt.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    resumed = run_ranks(_checkpoint_worker, 1, str(tmp_path), "resume", timeout=300)[0]
    assert "corrupt" in resumed, "a corrupted average was not refused"
    assert resumed["fresh"] is False and resumed["missing"] is False
    assert resumed["history"] == saved["history"]
    assert_close_rel(resumed["mains"], saved["mains"], 1e-3, "mains trained on")
    for method in ("sma", "wma"):
        assert_bitwise_equal(resumed["merges"][method], saved["merges"][method], method)
        continued = resumed["continued"][method]
        assert_close_rel(continued, saved["continued"][method], 1e-3, f"{method} continued")
