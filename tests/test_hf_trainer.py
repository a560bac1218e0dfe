"""The transformers ``Trainer`` with ``PMACallback`` on 2 CPU ranks (gloo), a tiny Llama.

References are float64 merges of the weights a separate callback records after every optimizer
step (DDP: the parameters; DeepSpeed: the fp32 masters gathered by DeepSpeed itself), never the
Merger's own output. One process group per engine runs several trainers in turn.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainerCallback, TrainerControl, TrainerState  # noqa: E402

from pma_dist import PMAConfigError  # noqa: E402
from pma_dist.integrations.hf import PMACallback  # noqa: E402
from pma_dist.testing import (  # noqa: E402
    assert_bitwise_equal,
    assert_close_rel,
    run_ranks,
    window_reference,
)

pytestmark = pytest.mark.integration

WORLD = 2
BATCH = 2
"""Per device: 2 ranks x 2 sequences x 16 tokens = 64 global tokens a step (32 local)."""
STEPS, SAVE_STEPS = 8, 3
PMA = {"method": "wma", "window": 4, "interval_tokens": 128}
"""A snapshot every 2nd step when the global tokens are counted; every 4th on local ones."""
DS_PMA = {"method": "ema", "window": 3, "interval_tokens": 256, "ema_alpha": 0.4}
"""In the DeepSpeed config; 4 sequences per device make 128 global tokens a step."""


class Recorder(TrainerCallback):
    """``read()`` after every optimizer step; ``read`` is given the trainer once it exists."""

    def __init__(self, read) -> None:
        self.read, self.trainer, self.weights = read, None, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.weights.append(self.read(self.trainer))


class Crash(TrainerCallback):
    """Raises in ``hook`` at ``step``: the run stops there as a killed job would."""

    def __init__(self, hook: str, step: int) -> None:
        def crash(args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt(f"{hook} at step {step}")

        setattr(self, hook, crash)


class SaveLate(TrainerCallback):
    """Asks for a checkpoint at ``step`` after ``PMACallback.on_step_end`` has run, as a save
    decided by evaluation (``save_strategy="best"``) is."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True


def _trainer(out: Path, callbacks: list, **overrides):
    from transformers import Trainer, TrainingArguments

    from tests.support.hf_models import TokenDataset, make_hf_model

    options = dict(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=4,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        include_num_input_tokens_seen=True,
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
    )
    args = TrainingArguments(**{**options, **overrides})
    data, held_out = TokenDataset(64), TokenDataset(8, seed=9000)
    trainer = Trainer(
        model=make_hf_model("llama"),
        args=args,
        train_dataset=data,
        eval_dataset=held_out,
        callbacks=callbacks,
    )
    for callback in callbacks:
        if isinstance(callback, Recorder):
            callback.trainer = trainer
    return trainer


def _params(trainer) -> dict[str, torch.Tensor]:
    from tests.support.models import full_state

    return full_state(trainer.model)


def _resume(out: Path, crash: Crash, *later: TrainerCallback, **overrides) -> dict:
    """Train until ``crash``, then resume from the last checkpoint in a new trainer once every
    rank has stopped (rank 0 may still be writing the checkpoint when the others stop)."""
    try:
        _trainer(out, [crash, PMACallback(PMA), *later], **overrides).train()
    except KeyboardInterrupt:
        torch.distributed.barrier()
    saved = {p.name for p in out.iterdir()} | {p.name for p in (out / "checkpoint-3").iterdir()}
    callback = PMACallback(PMA)
    trainer = _trainer(out, [callback], **overrides)
    trainer.train(resume_from_checkpoint=True)
    with callback.merger.swapped():
        merged = _params(trainer)
    return {"saved": saved, "merged": merged, "live": _params(trainer)}


def _ddp_worker(rank: int, world_size: int, root: str) -> dict:
    from pma_dist.backends import canonical_name

    root = Path(root)
    recorder, callback = Recorder(_params), PMACallback(PMA, export_dir=root / "merged")
    trainer = _trainer(root / "run", [recorder, callback])
    trainer.train()
    out = {"weights": recorder.weights, "history": callback.merger.history}
    with callback.merger.swapped():
        out["merged"] = _params(trainer)
    out["live"] = before = _params(trainer)
    out["eval_pma"] = callback.evaluate(trainer)
    out["restored"] = _params(trainer)
    snapshots = [w for i, w in enumerate(recorder.weights) if i % 2 == 1]
    expected = window_reference(snapshots, PMA["window"], PMA["method"])
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            p.copy_(expected[canonical_name(name)])
        out["eval_reference"] = trainer.evaluate()
        for name, p in trainer.model.named_parameters():
            p.copy_(before[canonical_name(name)])

    out["on_save"] = _resume(root / "a", Crash("on_save", SAVE_STEPS))
    out["after_save"] = _resume(root / "b", Crash("on_step_begin", SAVE_STEPS + 1))
    late = SaveLate(SAVE_STEPS)
    crash = Crash("on_step_begin", SAVE_STEPS + 1)
    out["saved_late"] = _resume(root / "c", crash, late, save_strategy="no")

    try:
        _trainer(root / "fsdp", [PMACallback(PMA)], fsdp=True).train()
        out["fsdp"] = "trained"
    except RuntimeError as err:
        out["fsdp"] = str(err)
    return out if rank == 0 else {}


def _one_rank_worker(rank: int, world_size: int, root: str) -> dict:
    """Resume the 2-rank run's checkpoint at step 3 on one rank: the PMA state reshards."""
    callback = PMACallback(PMA)
    run = Path(root) / "b"
    trainer = _trainer(run, [callback], max_steps=SAVE_STEPS)
    trainer.train(resume_from_checkpoint=str(run / f"checkpoint-{SAVE_STEPS}"))
    with callback.merger.swapped():
        return {"merged": _params(trainer), "history": callback.merger.history}


def test_ddp_merge_export_evaluate_resume_and_fsdp_refusal(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    result = run_ranks(_ddp_worker, WORLD, str(tmp_path), timeout=400)[0]
    assert len(result["weights"]) == STEPS
    assert result["history"] == [(s, 64 * s) for s in (2, 4, 6, 8)], "global tokens counted"
    snapshots = result["weights"][1::2]
    expected = window_reference(snapshots, PMA["window"], PMA["method"])
    assert_close_rel(result["merged"], expected, 1e-6, "DDP merge")

    exported = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(exported) == set(expected), "the export holds the merged model"
    assert_close_rel(exported, expected, 1e-6, "export")

    assert_bitwise_equal(result["restored"], result["live"], "live weights after evaluate")
    pma_loss = result["eval_pma"]["eval_pma_loss"]
    assert pma_loss == pytest.approx(result["eval_reference"]["eval_loss"], rel=1e-5)
    assert pma_loss != pytest.approx(result["eval_reference"]["eval_loss"] + 1.0)

    for case in ("on_save", "after_save", "saved_late"):
        resumed = result[case]
        assert_bitwise_equal(resumed["merged"], result["merged"], f"merge resumed ({case})")
        assert_bitwise_equal(resumed["live"], result["live"], f"weights resumed ({case})")
    assert "pma-staging-3" in result["on_save"]["saved"], "stopped before the rename"
    assert "pma" not in result["on_save"]["saved"]
    for case in ("after_save", "saved_late"):
        assert "pma" in result[case]["saved"] and "pma-staging-3" not in result[case]["saved"]

    refusal = "TrainingArguments(fsdp=True) is set but the model's parameters are not sharded"
    assert refusal in result["fsdp"], result["fsdp"]

    one = run_ranks(_one_rank_worker, 1, str(tmp_path), timeout=200)[0]
    assert one["history"] == [(2, 128)], one["history"]
    assert_close_rel(one["merged"], result["weights"][1], 1e-6, "resumed at world size 1")


def _deepspeed_worker(rank: int, world_size: int, root: str) -> dict:
    from pma_dist.deepspeed import attach
    from tests.support.deepspeed_runs import ds_config, full_fp32

    def masters(trainer) -> dict[str, torch.Tensor]:
        return full_fp32(trainer.model_wrapped)

    out = {}
    for stage in (2, 3):
        recorder, callback = Recorder(masters), PMACallback()
        trainer = _trainer(
            Path(root) / f"zero{stage}",
            [recorder, callback],
            deepspeed=ds_config(stage, world_size, DS_PMA),
            per_device_train_batch_size=4,
            bf16=True,
            save_strategy="no",
        )
        trainer.train()
        with callback.merger.swapped():
            merged = masters(trainer)
        live = masters(trainer)
        losses = (trainer.evaluate()["eval_loss"], callback.evaluate(trainer)["eval_pma_loss"])
        assert_bitwise_equal(masters(trainer), live, f"ZeRO-{stage} masters after evaluate")
        kind = callback.merger.backend.kind
        out[stage] = {"weights": recorder.weights, "merged": merged, "kind": kind, "eval": losses}

    class Attach(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            attach(trainer.model_wrapped, {"method": "sma", "window": 2, "interval_steps": 1})

    callback = PMACallback()
    trainer = _trainer(
        Path(root) / "engine",
        [Attach(), callback],
        deepspeed=ds_config(2, world_size, DS_PMA),
        per_device_train_batch_size=4,
        bf16=True,
        max_steps=3,
        save_steps=3,
    )
    trainer.train()
    engine = trainer.model_wrapped
    checkpoint = Path(root) / "engine" / "checkpoint-3"
    out["engine"] = {
        "same": callback.merger is engine.pma,
        "count": engine.pma.num_snapshots,
        "saved": sorted(p.name for p in checkpoint.iterdir()),
        "tag": sorted(p.name.split("_")[0] for p in (checkpoint / "global_step3").iterdir()),
    }
    return out if rank == 0 else {}


def test_deepspeed_pma_section_merges_fp32_masters(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    result = run_ranks(_deepspeed_worker, WORLD, str(tmp_path), timeout=400)[0]
    for stage, kind in ((2, "zero12"), (3, "zero3")):
        run = result[stage]
        assert run["kind"] == kind and len(run["weights"]) == STEPS
        snapshots = run["weights"][1::2]
        expected = window_reference(snapshots, 3, "ema", DS_PMA["ema_alpha"])
        assert_close_rel(run["merged"], expected, 1e-6, f"ZeRO-{stage} merge")
        live_loss, pma_loss = run["eval"]
        assert pma_loss != pytest.approx(live_loss, rel=1e-4), "evaluated the merge"
    engine = result["engine"]
    assert engine["same"] and engine["count"] == 3, "the engine's Merger, stepped once a step"
    assert "pma" not in engine["saved"] and "pma" in engine["tag"], "saved by the engine"


def _args(**values) -> SimpleNamespace:
    return SimpleNamespace(**{"deepspeed": None, "fsdp": None, **values})


@pytest.mark.parametrize(
    "config, counted, message",
    [
        (None, "all", "PMACallback(config=None): this run does not use DeepSpeed"),
        ({"interval_tokens": 100}, "no", "no global token count is available"),
    ],
)
def test_refused_before_training(config, counted: str, message: str) -> None:
    model = torch.nn.Linear(3, 2)
    callback = PMACallback(config)
    with pytest.raises(ValueError, match=re.escape(message)):
        callback.on_train_begin(
            _args(include_num_input_tokens_seen=counted),
            TrainerState(),
            TrainerControl(),
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        )
    assert callback.merger is None


def test_a_bad_config_fails_when_the_callback_is_made() -> None:
    with pytest.raises(PMAConfigError, match="pma.window = 0: must be a positive integer"):
        PMACallback({"window": 0, "interval_steps": 1})
