"""tools/gpu_run.py --dry-run on this CPU: the benchmark and the resumed training run, a summary, no write-back."""

import json

import pytest
from helpers import load_recipe, load_tool

from sde_mol.run.configs import DataConfig, ModelConfig, ModelSpec
from sde_mol.training.loop import LoopConfig


@pytest.mark.slow  # ~100 s: a benchmark and a training run in subprocesses
def test_dry_run_benchmarks_and_resumes_the_state(tmp_path):
    train_edm = load_recipe("train_edm")
    run = tmp_path / "run"
    cfg = train_edm.Config(
        spec=ModelSpec(ModelConfig(hidden=8, n_layers=1)),
        data=DataConfig(batch_size=8, n_train=64, buckets=(20, 29)),
        train=LoopConfig(steps=2, log_every=1, eval_every=100, ckpt_every=2),
        eval=train_edm.EvalConfig(n_valid=0, n_samples=0),
        out_dir=run,
    )
    train_edm.main(cfg)
    state = run / "last.eqx"
    before = state.read_bytes()
    gpu = load_tool("gpu_run")
    args = (
        "--spec.model.hidden",
        "8",
        "--spec.model.n-layers",
        "1",
        "--data.batch-size",
        "8",
        "--data.buckets",
        "20",
        "29",
    )
    summary = gpu.main(
        gpu.Config(state=state, preset="qm9-small", out_dir=tmp_path / "gpu", dry_run=True, train_args=args)
    )
    assert summary["steps"]["benchmark"]["returncode"] == 0, (tmp_path / "gpu" / "bench.log").read_text()[-2000:]
    assert summary["steps"]["train"]["returncode"] == 0, (tmp_path / "gpu" / "train.log").read_text()[-2000:]
    assert (summary["start_step"], summary["end_step"], summary["wrote_back"]) == (2, 4, False)
    assert json.loads((tmp_path / "gpu" / "bench.json").read_text())["results"]
    assert json.loads((tmp_path / "gpu" / "summary.json").read_text()) == summary
    assert state.read_bytes() == before  # a dry run writes nothing back
