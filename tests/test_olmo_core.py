"""OLMo-core's ``Trainer`` with ``PMACallback`` on 2 CPU ranks (gloo), a tiny FSDP2 transformer.

References are float64 merges of the full weights a separate callback records after every step,
and OLMo-core's own ``ModelMergeCallback`` run beside PMA; never the Merger's own output.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("olmo_core")

from pma_dist.testing import assert_close_rel, run_ranks, window_reference  # noqa: E402
from tests.support.olmo_runs import read_checkpoint  # noqa: E402

pytestmark = pytest.mark.integration

WORLD = 2
PMA = {"method": "wma", "window": 3, "interval_tokens": 128}
"""64 global tokens a step: a snapshot every 2nd step (every 4th if local tokens were counted)."""


def _side_by_side(rank: int, world: int, folder: str):
    from olmo_core.train.callbacks import ModelMergeCallback

    from pma_dist.integrations.olmo_core import PMACallback
    from tests.support.models import load_full_state
    from tests.support.olmo_runs import (
        Recorder,
        build_trainer,
        full_weights,
        held_out_evaluator,
    )

    recorder, evaluators = Recorder(), held_out_evaluator()
    pma = PMACallback(merge_step=6, merge_last_n_steps=3)
    theirs = ModelMergeCallback(merge_step=6, merge_last_n_steps=3, enabled=True)
    callbacks = {"pma": pma, "merge": theirs, "rec": recorder, "eval": evaluators}
    trainer = build_trainer(Path(folder), 8, callbacks)
    trainer.fit()
    model = trainer.train_module.model
    hooks = len(pma.merger._hooks)
    with pma.merger.swapped():
        merged = full_weights(model)
    evaluators.perform_eval(prefix="eval/live")
    load_full_state(model, window_reference(recorder.weights[:6], 3, "sma"))
    evaluators.perform_eval(prefix="eval/reference")
    losses = evaluators.losses
    return recorder.weights, merged, pma.merger.history, hooks, losses


def test_merge_equals_model_merge_callback(tmp_path: Path):
    """Every step over the last 3: PMA's merged checkpoint is ModelMergeCallback's (both fp32
    sums) and the float64 mean of the recorded weights; at the end the window is steps 6-8."""
    weights, merged, history, hooks, losses = run_ranks(_side_by_side, WORLD, str(tmp_path))[0]
    ours = read_checkpoint(tmp_path / "run" / "step6-pma")
    theirs = read_checkpoint(tmp_path / "run" / "step6-merged")
    assert set(ours) == set(theirs) == {f"model.{n}" for n in weights[0]}
    assert_close_rel(ours, theirs, 1e-6, "PMA vs ModelMergeCallback at step 6")
    expected = window_reference(weights[:6], 3, "sma")
    assert_close_rel(ours, {f"model.{n}": t for n, t in expected.items()}, 1e-6, "step 6")
    assert_close_rel(merged, window_reference(weights, 3, "sma"), 1e-6, "swapped at step 8")
    assert [step for step, _ in history] == [6, 7, 8]
    assert hooks == 0, "fit() closes the callback: no hook left behind"
    reference = losses["eval/reference"]
    assert losses["eval/pma"] == pytest.approx(reference, rel=1e-5), "evaluators on the merge"
    assert losses["eval/merged"] == pytest.approx(reference, rel=1e-5), "and on theirs"
    assert losses["eval/pma"] != pytest.approx(losses["eval/live"], rel=1e-3)


def _resume(rank: int, world: int, folder: str):
    from olmo_core.train.callbacks import ModelMergeCallback

    from pma_dist.integrations.olmo_core import PMACallback
    from tests.support.olmo_runs import Recorder, build_trainer, full_weights

    def run(name: str, steps: int, recorder: Recorder | None = None) -> PMACallback:
        pma = PMACallback(PMA, merge_step=8)
        theirs = ModelMergeCallback(merge_step=8, merge_last_n_steps=5, enabled=True)
        callbacks = {"pma": pma, "merge": theirs, **({"rec": recorder} if recorder else {})}
        build_trainer(Path(folder) / name, steps, callbacks, save_interval=5, batches=8).fit()
        return pma

    recorder = Recorder()
    whole = run("whole", 8, recorder)
    run("split", 5)  # stops after the checkpoint at step 5, mid-window (snapshot 4 held)
    resumed = run("split", 8)
    out = []
    for pma in (whole, resumed):
        with pma.merger.swapped():
            out.append((full_weights(pma.trainer.train_module.model), pma.merger.history))
    return recorder.weights, out


def test_resume_mid_window_equals_uninterrupted(tmp_path: Path):
    """Stopped after step 5's checkpoint and resumed: the merge at step 8 (snapshots 4, 6, 8,
    on global tokens) equals the uninterrupted run's and the float64 WMA of the recorded
    weights; ModelMergeCallback, resumed inside its window, skips its merge."""
    weights, ((whole, whole_history), (resumed, resumed_history)) = run_ranks(
        _resume, WORLD, str(tmp_path)
    )[0]
    expected = window_reference([weights[i - 1] for i in (2, 4, 6, 8)], 3, "wma")
    assert whole_history == resumed_history == [(4, 256), (6, 384), (8, 512)]
    assert_close_rel(whole, expected, 1e-6, "uninterrupted")
    assert_close_rel(resumed, expected, 1e-6, "resumed")
    saved = read_checkpoint(tmp_path / "split" / "run" / "step8-pma")
    assert_close_rel(saved, {f"model.{n}": t for n, t in expected.items()}, 1e-6, "saved")
    assert (tmp_path / "whole" / "run" / "step8-merged").is_dir()
    assert not (tmp_path / "split" / "run" / "step8-merged").exists()


def _other_world(rank: int, world: int, folder: str):
    from pma_dist.integrations.olmo_core import PMACallback
    from tests.support.olmo_runs import build_trainer, full_weights

    pma = PMACallback(PMA)
    build_trainer(Path(folder), 5, {"pma": pma}, batches=8).fit()
    with pma.merger.swapped():
        return full_weights(pma.trainer.train_module.model), pma.merger.history


def test_resume_at_another_world_size_reshards(tmp_path: Path):
    """A 2-rank checkpoint resumed at 1 rank: the state comes from the checkpoint's per-rank
    files, resharded, and merges as the 2-rank run did; without them it is refused."""
    saved, saved_history = run_ranks(_save_five, WORLD, str(tmp_path))[0]
    files = tmp_path / "run" / "step5" / "pma"
    files.rename(files.with_name("pma-aside"))
    with pytest.raises(RuntimeError, match="holds no per-rank PMA files to reshard from"):
        run_ranks(_other_world, 1, str(tmp_path))
    files.with_name("pma-aside").rename(files)
    merged, history = run_ranks(_other_world, 1, str(tmp_path))[0]
    assert history == saved_history == [(2, 128), (4, 256)]
    assert_close_rel(merged, saved, 1e-6, "resharded to 1 rank")


def _save_five(rank: int, world: int, folder: str):
    from pma_dist.integrations.olmo_core import PMACallback
    from tests.support.olmo_runs import build_trainer, full_weights

    pma = PMACallback(PMA)
    build_trainer(Path(folder), 5, {"pma": pma}, save_interval=5, batches=8).fit()
    with pma.merger.swapped():
        return full_weights(pma.trainer.train_module.model), pma.merger.history
