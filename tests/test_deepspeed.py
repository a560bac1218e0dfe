"""DeepSpeed ZeRO 1/2/3 on CPU (gloo), bf16: PMA from a config flag, averaging the fp32 masters.

References come from DeepSpeed itself (``safe_get_full_fp32_param`` after every step), merged
in float64; the working bf16 weights a forward sees are checked too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")

from pma_dist import PMAConfigError, PMAStateError  # noqa: E402
from pma_dist.testing import (  # noqa: E402
    assert_bitwise_equal,
    assert_close_rel,
    run_ranks,
    window_reference,
)
from tests.support.deepspeed_runs import (  # noqa: E402
    assembled_fp32,
    ds_config,
    engine_step,
    full_fp32,
    full_working,
    gathered_fp32,
    make_engine,
    make_moe_engine,
    moe_run,
    moe_step,
)
from tests.support.probes import counted_calls  # noqa: E402

PMA = {"method": "wma", "window": 3, "interval_steps": 1, "ema_alpha": 0.3}
STEPS = 5


def _with_buffers(params):
    """The fp32 masters and the averaged buffer of a ``BufferedLM`` engine."""

    def read(engine) -> dict:
        return {**params(engine), "balance": engine.module.balance.detach().clone()}

    return read


def _parity_worker(rank: int, world_size: int, stage: int, zero: dict) -> dict:
    engine = make_engine(stage, world_size, PMA, buffered=True, **zero)
    out: dict = {"snapshots": [], "losses": [], "kind": engine.pma.backend.kind}
    masters = full_fp32 if not zero.get("round_robin_gradients") else assembled_fp32
    reference = _with_buffers(masters)
    for step in range(STEPS):
        engine.module.update_buffers(step)
        out["losses"].append(engine_step(engine, step, rank, world_size))
        snapshot, working = reference(engine), full_working(engine)
        out["snapshots"].append(snapshot)
        out.setdefault("fragments_vs_working", []).append((assembled_fp32(engine), working))
        with engine.pma.swapped("ema" if step % 2 else None):
            out.setdefault("merged", []).append(reference(engine))
            out.setdefault("merged_working", []).append(full_working(engine))
            out.setdefault("live_integer_buffer", []).append(int(engine.module.seen))
        assert all(torch.equal(snapshot[k], v) for k, v in reference(engine).items()), "master"
        assert all(torch.equal(working[k], v) for k, v in full_working(engine).items()), "working"
    assert engine.pma.num_snapshots == STEPS
    out["master_shapes"] = engine.pma.backend.master_shapes()
    assert engine.pma.buffer_names == ["balance"], "persistent floating buffers only"
    assert engine.pma._step_hooked, "the wrapped torch optimizer orders its step after copies"
    plain = make_engine(stage, world_size, None, **zero)
    out["losses_without_pma"] = [engine_step(plain, s, rank, world_size) for s in range(STEPS)]
    return out if rank == 0 else {}


@pytest.mark.parametrize(
    "stage, world_size, zero",
    [
        (1, 2, {}),
        (2, 2, {"round_robin_gradients": True}),
        (2, 2, {"offload_optimizer": {"device": "cpu"}}),
        (3, 2, {}),
        (3, 4, {"stage3_param_persistence_threshold": 0}),
        (1, 2, {"grad_accum_dtype": "fp32"}),
    ],
)
def test_zero_stage_merges_fp32_masters(stage: int, world_size: int, zero: dict) -> None:
    result = run_ranks(_parity_worker, world_size, stage, zero)[0]
    kinds = {3: "zero3", 2: "zero12", 1: "bf16" if "grad_accum_dtype" in zero else "zero12"}
    assert result["kind"] == kinds[stage]
    assert result["live_integer_buffer"] == list(range(1, STEPS + 1)), "integer buffers stay live"
    shapes = {k: tuple(v.shape) for k, v in result["snapshots"][-1].items() if k != "balance"}
    assert result["master_shapes"] == shapes, "every rank names and shapes every master alone"
    for step, (merged, working) in enumerate(zip(result["merged"], result["merged_working"])):
        method = "ema" if step % 2 else "wma"
        expected = window_reference(result["snapshots"][: step + 1], 3, method, 0.3)
        assert_close_rel(merged, expected, 1e-6, f"stage {stage} step {step}")
        merged = {k: v for k, v in merged.items() if k != "balance"}
        rounded = {k: v.to(torch.bfloat16) for k, v in merged.items()}
        assert_bitwise_equal(working, rounded, "forward sees the merged master in bf16")
    assert result["losses"] == result["losses_without_pma"], "swaps changed training"
    for assembled, working in result["fragments_vs_working"]:
        rounded = {k: v.to(torch.bfloat16) for k, v in assembled.items()}
        assert_bitwise_equal(working, rounded, "fragments map the real partition layout")


def _checkpoint_worker(rank, world_size, root, stage, mode) -> dict:
    pma = {"method": "ema", "window": 3, "interval_steps": 1}
    engine = make_engine(stage, world_size, pma, seed=0 if mode == "save" else 7)
    out = {}
    if mode == "save":
        for step in range(4):
            engine_step(engine, step, rank, world_size)
        engine.save_checkpoint(root)
        with engine.pma.swapped():
            out["merged_at_save"] = full_fp32(engine)
        for step in range(4, 7):
            engine_step(engine, step, rank, world_size)
    elif mode == "resume":
        engine.load_checkpoint(root)
        for step in range(4, 7):
            engine_step(engine, step, rank, world_size)
    else:
        if mode == "module_only":
            load_path, _ = engine.load_checkpoint(
                root, load_module_only=True, load_optimizer_states=False
            )
            assert load_path is not None
        else:
            engine.pma.load(Path(root) / "global_step4")
        with engine.pma.swapped():
            out["merged_at_load"] = full_fp32(engine)
        out["count"] = engine.pma.num_snapshots
        return out if rank == 0 else {}
    with engine.pma.swapped():
        out["merged_end"] = full_fp32(engine)
    out["history"] = list(engine.pma.history)
    return out if rank == 0 else {}


def test_checkpoints_resume_bitwise_and_reshard(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    saved = run_ranks(_checkpoint_worker, 2, root, 2, "save")[0]
    step_dir = tmp_path / "ckpt" / "global_step4"
    files = sorted(p.name.rsplit("_", 1)[1] for p in step_dir.glob("pma_*_rank*.safetensors"))
    assert files == ["rank00000.safetensors", "rank00001.safetensors"], "every rank's state"
    assert (step_dir / "pma_index.json").is_file()

    resumed = run_ranks(_checkpoint_worker, 2, root, 2, "resume")[0]
    assert_bitwise_equal(resumed["merged_end"], saved["merged_end"], "resume at 2 ranks")
    assert resumed["history"] == saved["history"]

    for world_size, stage, mode in (
        (4, 2, "module_only"),
        (4, 1, "module_only"),
        (2, 3, "pma_only"),
    ):
        loaded = run_ranks(_checkpoint_worker, world_size, root, stage, mode)[0]
        assert loaded["count"] == 4
        assert_bitwise_equal(
            loaded["merged_at_load"], saved["merged_at_save"], f"{world_size} ranks, ZeRO-{stage}"
        )


def _refuse_worker(rank, world_size, root) -> str:
    engine = make_engine(2, world_size, {"method": "ema", "window": 4, "interval_steps": 1}, seed=3)
    before = full_fp32(engine)
    try:
        engine.load_checkpoint(root)
    except PMAStateError as err:
        unchanged = all(torch.equal(before[k], v) for k, v in full_fp32(engine).items())
        return f"{err} | unchanged={unchanged}"
    return "loaded"


def test_incompatible_state_is_refused_before_deepspeed_loads(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    run_ranks(_checkpoint_worker, 2, root, 2, "save")
    before = {p: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    message = run_ranks(_refuse_worker, 2, root)[0]
    assert "pma.window = 3" in message and message.endswith("unchanged=True"), message
    assert {p: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()} == before


def _moe_worker(rank, world_size) -> dict:
    return moe_run(rank, world_size, PMA)


@pytest.mark.parametrize("world_size", [2, 4])
def test_moe_expert_parallel_every_global_expert_once(world_size: int) -> None:
    result = run_ranks(_moe_worker, world_size)[0]
    experts = sorted(
        {
            k.split(".deepspeed_experts.")[1].split(".")[0]
            for k in result["merged"]
            if "deepspeed_experts" in k
        }
    )
    assert experts == ["0", "1", "2", "3"], experts
    expected = window_reference(result["snapshots"], 3, "wma")
    assert_close_rel(result["merged"], expected, 1e-6, f"MoE at {world_size} ranks")


def test_unsupported_deepspeed_versions_fail_at_initialize(monkeypatch) -> None:
    from pma_dist.backends import check_deepspeed_version as check_version
    from pma_dist.deepspeed import initialize

    check_version(deepspeed.__version__)
    for version in ("0.16.4", "0.18.9", "0.20.0", "1.0.0", "dev"):
        with pytest.raises(RuntimeError, match=rf"DeepSpeed {version} is not supported"):
            check_version(version)
    monkeypatch.setattr(deepspeed, "__version__", "0.18.2")
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match=r"DeepSpeed 0\.18\.2 .*deepspeed>=0\.19,<0\.20"):
        initialize(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            config={"pma": {"interval_steps": 1}},
        )


@pytest.mark.parametrize(
    "section, fragment",
    [
        ({"interval_steps": 1, "windw": 3}, "pma.windw (did you mean 'window'?)"),
        ({"interval_steps": 1, "window": 0}, "pma.window = 0"),
        ({"interval_steps": "often"}, "pma.interval_steps = 'often'"),
        ({"interval_steps": 1, "method": 3}, "pma.method = 3"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_pma_sections_fail_at_initialize(section, fragment) -> None:
    from pma_dist.deepspeed import initialize

    model = torch.nn.Linear(3, 2)
    with pytest.raises(PMAConfigError) as err:
        initialize(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            config={"pma": section},
        )
    assert fragment in str(err.value)


def _export_worker(rank, world_size, root) -> dict:
    from transformers import AutoModelForCausalLM

    from pma_dist.deepspeed import initialize
    from tests.support.hf_models import hf_batch, hf_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config("llama"), attn_implementation="eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = initialize(model=model, optimizer=optimizer, config=ds_config(3, world_size, PMA))
    snapshots = []
    for step in range(3):
        tokens = hf_batch(step, rank, world_size)
        engine.backward(engine(input_ids=tokens, labels=tokens).loss)
        engine.step()
        snapshots.append(full_fp32(engine))
    probe = hf_batch(99)[:2]
    with torch.no_grad(), engine.pma.swapped():
        merged = full_fp32(engine)
        logits = engine(input_ids=probe).logits.float()
    with counted_calls(sizes=True) as calls:
        engine.pma.export(Path(root) / "zero3", max_shard_size="24KB")
    engine.save_checkpoint(str(Path(root) / "ckpt"), tag="t")
    if rank != 0:
        return {"calls": calls}
    return {
        "merged": merged,
        "logits": logits,
        "probe": probe,
        "snapshots": snapshots,
        "calls": calls,
    }


def test_zero3_export_loads_with_transformers(tmp_path: Path) -> None:
    """Online, and offline from the checkpoint's per-rank PMA state with another merge."""
    from transformers import AutoModelForCausalLM

    from pma_dist.export import ExportError, convert_to_hf, verify_export
    from tests.support.cli import run_cli
    from tests.support.hf_models import hf_config

    results = run_ranks(_export_worker, 2, str(tmp_path))
    result = results[0]
    assert verify_export(tmp_path / "zero3") == []
    for r in results:
        point_to_point = ("send numel", "recv numel")
        moved = {k: v for k, v in r["calls"].items() if k.endswith(" numel")}
        moved = {k: v for k, v in moved.items() if k not in point_to_point}
        assert max(moved.values(), default=0) <= 64, ("only the writer gathers", r["calls"])
        everyone = ("all_gather", "all_gather_object")
        assert not any(r["calls"].get(c) for c in everyone), ("O(world) per rank", r["calls"])
    sends = [r["calls"]["send"] for r in results]
    assert sum(sends) == sum(r["calls"]["recv"] for r in results) and all(sends), sends
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "zero3", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    state = {k: v for k, v in loaded.state_dict().items() if k in result["merged"]}
    assert_bitwise_equal(state, result["merged"], "exported fp32 master")
    with torch.no_grad():
        logits = loaded(input_ids=result["probe"]).logits
    assert_close_rel({"l": logits}, {"l": result["logits"]}, 3e-2, "bf16 engine vs fp32 export")

    args = ["--config", str(tmp_path / "zero3"), "--method", "minus_sqrt", "--stride", "2"]
    done = run_cli("export", str(tmp_path / "ckpt" / "t"), str(tmp_path / "offline"), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert verify_export(tmp_path / "offline") == []
    first, _, last = [{k: v.double() for k, v in s.items()} for s in result["snapshots"]]
    c = 1 - math.sqrt(0.5)
    expected = {k: (1 - c) * first[k] + c * last[k] for k in first}
    offline = AutoModelForCausalLM.from_pretrained(tmp_path / "offline").state_dict()
    assert_close_rel({k: offline[k].double() for k in expected}, expected, 1e-6, "offline")
    deeper = hf_config("llama")
    deeper.num_hidden_layers += 1
    with pytest.raises(ExportError, match=r"holds no 'model.layers.\d.*of the model's"):
        convert_to_hf(tmp_path / "ckpt" / "t", tmp_path / "bad", config=deeper)
    assert not (tmp_path / "bad").exists()


EXPERT = r"moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\d+)\.(weight|bias)"


def _hub_name(name: str) -> str:
    import re

    match = re.fullmatch(EXPERT, name)
    return f"experts.{match[1]}.w{match[2]}.{match[3]}" if match else name


def _moe_export_worker(rank, world_size, root) -> dict:
    from pma_dist.export import ExportError

    engine = make_moe_engine(world_size, ep_size=2, pma=PMA)
    for step in range(3):
        moe_step(engine, step, rank, world_size)
    with engine.pma.swapped():
        merged = gathered_fp32(engine)
    engine.pma.export(Path(root) / "moe", rename=_hub_name)
    try:
        engine.pma.export(Path(root) / "bad", rename=lambda n: "experts.0" if "experts" in n else n)
        clash = "exported"
    except ExportError as err:
        clash = str(err)
    return (
        {"merged": {_hub_name(k): v for k, v in merged.items()}, "clash": clash}
        if rank == 0
        else {}
    )


@pytest.mark.parametrize("world_size", [2, 4])
def test_moe_export_has_every_expert_once(tmp_path: Path, world_size: int) -> None:
    from safetensors.torch import load_file

    from pma_dist.export import verify_export

    result = run_ranks(_moe_export_worker, world_size, str(tmp_path))[0]
    assert verify_export(tmp_path / "moe") == []
    exported = load_file(tmp_path / "moe" / "model.safetensors")
    experts = sorted({k.split(".")[1] for k in exported if k.startswith("experts.")})
    assert experts == ["0", "1", "2", "3"]
    assert_bitwise_equal(exported, result["merged"], "MoE export")
    assert "rename maps both" in result["clash"] and not (tmp_path / "bad").exists()


def _tokens_and_apply_worker(rank, world_size) -> dict:
    engine = make_engine(3, world_size, {"window": 3, "interval_tokens": 100})
    counts = []
    for step in range(6):
        engine.pma.add_tokens(30)
        engine.pma.add_tokens(20)
        engine_step(engine, step, rank, world_size)
        counts.append(engine.pma.num_snapshots)
    with engine.pma.swapped():
        merged = full_fp32(engine)
    engine.pma.apply()
    applied, working = full_fp32(engine), full_working(engine)
    engine.pma.add_tokens(50)
    loss = engine_step(engine, 6, rank, world_size)
    plain = make_engine(2, world_size, {"window": 3, "interval_tokens": 100}, seed=1)
    try:
        engine_step(plain, 0, rank, world_size)
        missing = "no error"
    except ValueError as err:
        missing = str(err)
    return {
        "counts": counts,
        "merged": merged,
        "applied": applied,
        "working": working,
        "loss": loss,
        "missing": missing,
    }


def test_tokens_from_micro_batches_and_apply_under_zero3() -> None:
    result = run_ranks(_tokens_and_apply_worker, 2)[0]
    assert result["counts"] == [0, 1, 1, 2, 2, 3], "a snapshot every 100 tokens of 50 per step"
    assert_bitwise_equal(result["applied"], result["merged"], "apply() writes the merge")
    rounded = {k: v.to(torch.bfloat16) for k, v in result["merged"].items()}
    assert_bitwise_equal(result["working"], rounded, "and the working weights follow")
    assert torch.isfinite(torch.tensor(result["loss"]))
    assert "pass tokens=" in result["missing"] and "tokens_per_step" in result["missing"]


def _detach_worker(rank: int, world_size: int, root: str) -> dict:
    from pma_dist.backends import unwrap_optimizer
    from pma_dist.deepspeed import detach

    engine = make_engine(2, world_size, {"window": 2, "interval_steps": 1, "offload": "cpu"})
    inner = unwrap_optimizer(engine.optimizer)
    out = {"hooks_attached": len(inner._optimizer_step_pre_hooks)}
    merger = detach(engine)
    out["hooks_left"] = len(inner._optimizer_step_pre_hooks)
    out["patched_left"] = sorted(
        n for n in ("step", "save_checkpoint", "load_checkpoint", "pma") if n in vars(engine)
    )
    plain = make_engine(2, world_size, None)
    out["losses"] = [engine_step(engine, s, rank, world_size) for s in range(3)]
    out["plain_losses"] = [engine_step(plain, s, rank, world_size) for s in range(3)]
    out["snapshots_after_detach"] = merger.num_snapshots
    engine.save_checkpoint(root, tag="after")
    out["second_detach"] = detach(engine)
    return out


def test_detach_puts_the_engine_back_as_it_was(tmp_path: Path) -> None:
    for result in run_ranks(_detach_worker, 2, str(tmp_path)):
        assert result["hooks_attached"] == 1 and result["hooks_left"] == 0
        assert result["patched_left"] == [], "engine methods restored, engine.pma gone"
        assert result["losses"] == result["plain_losses"], "trains exactly as a plain engine"
        assert result["snapshots_after_detach"] == 0 and result["second_detach"] is None
    assert not list((tmp_path / "after").rglob("pma_*")), "no PMA state saved after detach"
    assert list((tmp_path / "after").iterdir()), "DeepSpeed's own checkpoint is written"
