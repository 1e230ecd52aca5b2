"""sde_mol/cli.py: every recipe and tool checks its arguments before any work; a user's mistake is one line
`error: ...` on stderr naming the flag or file, exit status 2, and nothing is written."""

import equinox as eqx
import numpy as np
import pytest
import tyro
from helpers import ROOT, load_recipe, load_tool

from sde_mol import checkpoint, cli
from sde_mol.run.load import load_denoiser

SMALL = ROOT / "checkpoints" / "edm_qm9_small.eqx"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "garbage.eqx").write_bytes(b"this is not a checkpoint\n")
    (d / "a_file").write_text("x")
    den, _, header = load_denoiser(SMALL)
    bad = eqx.tree_at(lambda m: m.net.embedding.weight, den, replace_fn=lambda w: w.at[0, 0].set(np.inf))
    checkpoint.save(d / "inf.eqx", bad, kind="denoiser", config=header["config"], step=1)
    return d


def _parse(name: str, args: list[str]):
    if name == "convert_edm_checkpoint":
        module = load_tool(name)
        return module, lambda: tyro.cli(module.Config, args=args)
    module = load_recipe(name)
    if name == "train_edm":
        return module, lambda: tyro.extras.overridable_config_cli(module.PRESETS, args=["qm9-small", *args])
    return module, lambda: tyro.cli(module.Config, args=args)


OUT = "{out}"
CASES = [
    # recipe, arguments, what the one line must say
    ("sample", ["--n-samples", "-5"], "--n-samples: expected an integer >= 1, got -5"),
    ("sample", ["--n-samples", "0"], "--n-samples: expected an integer >= 1"),
    ("sample", ["--sampler.steps", "0"], "--sampler.steps: expected an integer >= 1"),
    ("sample", ["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    ("sample", ["--sampler.eta", "-1"], "--sampler.eta: expected a finite number >= 0"),
    ("sample", ["--sampler.adaptive", "--sampler.rtol", "0"], "--sampler.rtol: expected a finite number > 0"),
    ("sample", ["--sampler.atol", "-1e-3"], "--sampler.atol: expected a finite number > 0"),
    ("sample", ["--sampler.max-steps", "0"], "--sampler.max-steps: expected an integer >= 1"),
    ("sample", ["--sampler.rho", "0"], "--sampler.rho: expected a finite number > 0"),
    ("sample", ["--buckets", "0", "29"], "--buckets: expected an integer >= 1, got 0"),
    ("sample", ["--checkpoint", "/nonexistent/model.eqx"], "--checkpoint: /nonexistent/model.eqx does not exist"),
    ("sample", ["--checkpoint", "{files}/garbage.eqx"], "garbage.eqx: not an sde_mol checkpoint"),
    ("sample", ["--checkpoint", "{files}/inf.eqx"], "inf.eqx: leaf .net.embedding.weight holds 1 non-finite"),
    ("sample", ["--checkpoint", str(SMALL), "--sampler.sampler", "consistency"], "not a consistency model"),
    ("sample", ["--out-dir", "{files}/a_file"], "--out-dir: "),
    ("sample", ["--sampler.sampler", "ancestral", "--sampler.steps", "2000"], "needs at most its T = 1000 steps"),
    ("pf_ode_sample", ["--steps", "0"], "--steps: expected an integer >= 1"),
    ("pf_ode_sample", ["--adaptive", "--rtol", "0", "--atol", "0"], "--rtol: expected a finite number > 0"),
    ("pf_ode_sample", ["--max-steps", "-3"], "--max-steps: expected an integer >= 1"),
    ("pf_ode_sample", ["--n-samples", "-1"], "--n-samples: expected an integer >= 1"),
    ("pf_ode_sample", ["--checkpoint", "/nonexistent.eqx"], "--checkpoint: /nonexistent.eqx does not exist"),
    ("train_edm", ["--optim.lr", "nan"], "--optim.lr: expected a finite number > 0, got nan"),
    ("train_edm", ["--optim.lr", "-1e-4"], "--optim.lr: expected a finite number > 0"),
    ("train_edm", ["--train.steps", "-5"], "--train.steps: expected an integer >= 1, got -5"),
    ("train_edm", ["--data.batch-size", "0"], "--data.batch-size: expected an integer >= 1"),
    ("train_edm", ["--data.n-train", "10"], "--data.n-train: expected at least one batch (--data.batch-size 64)"),
    ("train_edm", ["--optim.ema-decay", "1.5"], "--optim.ema-decay: expected a decay in [0, 1)"),
    ("train_edm", ["--optim.warmup-steps", "-1"], "--optim.warmup-steps: expected an integer >= 0"),
    ("train_edm", ["--train.max-minutes", "0"], "--train.max-minutes: expected a finite number > 0"),
    ("train_edm", ["--train.log-every", "0"], "--train.log-every: expected an integer >= 1"),
    ("train_edm", ["--resume", str(SMALL)], "expected a train_state checkpoint (runs/<name>/last.eqx), got a denoiser"),
    ("train_edm", ["--resume", "/nonexistent/last.eqx"], "--resume: /nonexistent/last.eqx does not exist"),
    ("train_edm", ["--out-dir", "{files}/a_file"], "--out-dir: "),
    ("convert_edm_checkpoint", ["--input", "{files}/a_file", "--output", OUT], "a_file: not a readable zip archive"),
    ("convert_edm_checkpoint", ["--input", "/nonexistent.npy", "--output", OUT], "--input: /nonexistent.npy does not"),
    ("convert_edm_checkpoint", ["--input", str(SMALL), "--output", OUT], "an sde_mol checkpoint, not EDM weights"),
    ("convert_edm_checkpoint", ["--check", "/nonexistent.npz"], "--check: /nonexistent.npz does not exist"),
    ("evaluate", ["--input", "/nonexistent.sdf"], "--input: /nonexistent.sdf does not exist"),
    ("consistency_distill", ["--teacher", "/nonexistent.eqx"], "--teacher: /nonexistent.eqx does not exist"),
    ("consistency_distill", ["--n-points", "1"], "--n-points: expected an integer >= 2, got 1"),
    ("progressive_distill", ["--rounds", "0"], "--rounds: expected an integer >= 1"),
    ("progressive_distill", ["--teacher-steps", "0"], "--teacher-steps: expected an integer >= 1"),
]


@pytest.mark.parametrize("name, args, message", CASES, ids=[f"{c[0]}:{' '.join(c[1])[:40]}" for c in CASES])
def test_a_bad_argument_is_one_line_exit_2_and_writes_nothing(name, args, message, files, tmp_path, capsys):
    out = tmp_path / "out"
    args = [a.format(files=files, out=out / "x.eqx") for a in args]
    if name != "convert_edm_checkpoint" and "--out-dir" not in args and name != "evaluate":
        args += ["--out-dir", str(out)]
    module, parse = _parse(name, args)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(module.main, parse)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message.format(files=files) in err[0], err[0]
    assert not out.exists()


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("SDE_MOL_DEBUG", "1")
    module, parse = _parse("sample", ["--n-samples", "-5"])
    with pytest.raises(cli.UsageError, match="--n-samples"):
        cli.run(module.main, parse)
