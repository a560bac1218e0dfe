"""lm-evaluation-harness loads a merged export and scores a local task, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pma_dist import Merger, PMAConfig

DATA = Path(__file__).parent / "data" / "lm_eval"


def test_lm_eval_scores_the_export(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, ByT5Tokenizer, LlamaConfig

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    merger = Merger(model, optimizer, PMAConfig(window=2, interval_steps=1))
    for _ in range(2):
        ids = tokenizer("def f(x):\n    return x + 1\n", return_tensors="pt").input_ids
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        merger.step()
    merger.export(tmp_path / "merged", tokenizer=tokenizer)

    task = tmp_path / "tasks" / "pma_tiny.yaml"
    task.parent.mkdir()
    template = (DATA / "pma_tiny.yaml.template").read_text()
    task.write_text(template.format(data_file=DATA / "pma_tiny.jsonl"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [
            sys.executable, "-m", "lm_eval",
            "--model", "hf",
            "--model_args", f"pretrained={tmp_path / 'merged'},dtype=float32",
            "--tasks", "pma_tiny",
            "--include_path", str(task.parent),
            "--device", "cpu",
            "--batch_size", "4",
            "--output_path", str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    accuracy = results["results"]["pma_tiny"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
    assert results["config"]["model_args"]["pretrained"] == str(tmp_path / "merged")
    assert results["n-samples"]["pma_tiny"]["effective"] == 6
