"""Recipe smoke tests on tiny configs: train -> resume -> sample (PF-ODE, ancestral, DDIM) -> files + metrics."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from helpers import load_recipe
from rdkit import Chem

from sde_mol import checkpoint, io
from sde_mol.cli import UsageError
from sde_mol.run.configs import DataConfig, ModelConfig, ModelSpec, SamplerConfig
from sde_mol.run.load import load_denoiser
from sde_mol.training.loop import LoopConfig

_recipe = load_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    train_edm = _recipe("train_edm")
    out = tmp_path_factory.mktemp("run")
    cfg = train_edm.Config(
        spec=ModelSpec(ModelConfig(hidden=8, n_layers=1)),
        data=DataConfig(batch_size=8, n_train=64, buckets=(20, 29)),
        train=LoopConfig(steps=4, log_every=2, eval_every=4, ckpt_every=2),
        eval=train_edm.EvalConfig(n_valid=8, n_samples=4, sampler=SamplerConfig("ddim", steps=3), batch_size=4),
        out_dir=out,
    )
    train_edm.main(cfg)
    return train_edm, cfg, out


def test_train_writes_logs_and_checkpoints(trained):
    _, cfg, out = trained
    assert (out / "config.json").is_file() and (out / "last.eqx").is_file() and (out / "best.eqx").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == [2, 4] and all(np.isfinite(x["loss"]) for x in lines if "loss" in x)
    evals = [x["eval"] for x in lines if "eval" in x]
    assert len(evals) == 1 and np.isfinite(evals[0]["val_nll"]) and 0 <= evals[0]["validity"] <= 1
    assert evals[0]["val_nll_sem"] > 0  # the one-draw bound's standard error goes beside it
    header = checkpoint.read_header(out / "last.eqx")
    assert header["kind"] == "train_state" and header["step"] == 4


def test_resume_continues_from_checkpoint(trained):
    train_edm, cfg, out = trained
    # a killed run: a checkpoint temp file left behind, and rows logged after the last checkpoint (step 4)
    (out / ".last.eqx.abc123.tmp").write_bytes(b"half a checkpoint")
    with open(out / "metrics.jsonl", "a") as log:
        log.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    cfg2 = replace(cfg, resume=out / "last.eqx", train=replace(cfg.train, steps=6))
    train_edm.main(cfg2)
    assert not list(out.glob(".*.tmp"))
    assert checkpoint.read_header(out / "last.eqx")["step"] == 6
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [2, 4, 6]
    # a mismatching model spec is refused
    bad = replace(cfg2, spec=ModelSpec(ModelConfig(hidden=16, n_layers=1)))
    with pytest.raises(ValueError, match="model spec"):
        train_edm.main(bad)


def test_init_from_carries_the_network_over_to_another_sde(trained, tmp_path):
    """Fine-tuning: --init-from a checkpoint at T = 1000 into T = 200 keeps the network, says so, evaluates the
    starting point first (eval_at_start) and writes checkpoints with the new SDE; another network is refused."""
    train_edm, cfg, out = trained
    source, _, source_header = load_denoiser(out / "last.eqx")
    start = source_header["step"]  # the step count continues from the source's
    spec = replace(cfg.spec, sde=replace(cfg.spec.sde, timesteps=200))
    ft = replace(
        cfg,
        spec=spec,
        init_from=out / "last.eqx",
        optim=replace(cfg.optim, warmup_steps=1, decay_steps=2, lr_end=1e-6),
        train=replace(cfg.train, steps=start + 2, eval_at_start=True),
        out_dir=tmp_path / "ft",
    )
    train_edm.main(ft)
    lines = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert "eval" in lines[0] and lines[0]["step"] == start  # the imported model, before any step
    den, stored, header = load_denoiser(tmp_path / "ft" / "last.eqx", which="model")
    assert stored.sde.timesteps == 200 and den.sde.gamma_table.shape == (201,)
    assert header["step"] == start + 2
    assert not np.allclose(den.net.embedding.weight, source.net.embedding.weight)  # it trained
    with pytest.raises(ValueError, match="only the SDE may change"):
        train_edm.main(replace(ft, spec=replace(spec, model=ModelConfig(hidden=16, n_layers=1))))


def test_low_noise_loss_is_stored_and_kept_on_resume(trained, tmp_path):
    """--loss.* reaches the header of a run that sets it; resuming it with other loss settings (or EDM's) is
    refused, with the same settings it continues; a run on EDM's loss keeps headers without the key."""
    train_edm, cfg, out = trained
    assert "loss" not in checkpoint.read_header(out / "last.eqx")["config"]
    start = checkpoint.read_header(out / "last.eqx")["step"]
    low = train_edm.EpsLossConfig(low_noise_fraction=0.5, low_noise_t_max=0.2)
    ft = replace(
        cfg,
        init_from=out / "last.eqx",
        loss=low,
        train=replace(cfg.train, steps=start + 2),
        eval=replace(cfg.eval, n_samples=0),
        out_dir=tmp_path / "low",
    )
    train_edm.main(ft)
    last = tmp_path / "low" / "last.eqx"
    assert checkpoint.read_header(last)["config"]["loss"] == {"low_noise_fraction": 0.5, "low_noise_t_max": 0.2}
    resumed = replace(ft, init_from=None, resume=last, train=replace(ft.train, steps=start + 4))
    for other in (train_edm.EpsLossConfig(), replace(low, low_noise_t_max=0.1)):
        with pytest.raises(UsageError, match="loss settings"):
            train_edm.main(replace(resumed, loss=other))
    train_edm.main(resumed)
    assert checkpoint.read_header(last)["step"] == start + 4
    preset = train_edm.PRESETS["qm9-finetune-low-noise"][1]  # the preset continues the default model
    assert preset.loss.low_noise_fraction > 0 and preset.init_from.name == "edm_qm9_finetuned.eqx"


def test_pf_ode_sample_recipe(trained, tmp_path):
    _, _, out = trained
    pf = _recipe("pf_ode_sample")
    res = pf.main(
        pf.Config(checkpoint=out / "last.eqx", steps=3, n_samples=6, batch_size=4, out_dir=tmp_path, novelty=False)
    )
    m = json.loads((tmp_path / "metrics.json").read_text())
    for k in ("n_molecules", "atom_stability", "molecule_stability", "validity", "uniqueness", "valid_and_unique"):
        assert 0 <= m[k] <= 1 or k == "n_molecules"
    assert m["n_molecules"] == 6 and m["nfe"] == 3 * 2 + 1 and m["molecules_per_second"] > 0
    assert res["checkpoint_step"] == checkpoint.read_header(out / "last.eqx")["step"]
    pos, types = io.read_molecules(tmp_path / "samples.sdf")
    assert pos.shape[0] == 6 and types.shape[0] == 6
    # a second run into the same folder is refused (nothing lost), and replaces the first with --overwrite
    again = pf.Config(checkpoint=out / "last.eqx", steps=2, n_samples=4, batch_size=4, out_dir=tmp_path, novelty=False)
    with pytest.raises(UsageError, match=r"already holds samples.sdf, molecules.csv, metrics.json, config.json"):
        pf.main(again)
    assert io.read_molecules(tmp_path / "samples.sdf")[0].shape[0] == 6
    pf.main(replace(again, overwrite=True))
    assert io.read_molecules(tmp_path / "samples.sdf")[0].shape[0] == 4


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "reverse_sde"])
def test_sample_recipe(trained, tmp_path, sampler):
    _, _, out = trained
    sample = _recipe("sample")
    cfg = sample.GenerateConfig(
        checkpoint=out / "best.eqx",
        sampler=SamplerConfig(sampler, steps=4),
        n_samples=3,
        batch_size=3,
        buckets=(29,),  # one width, one compilation: bucketed sampling has its own tests (test_samplers.py)
        out_dir=tmp_path,
        format="both",
        novelty=False,
    )
    m = sample.main(cfg)
    assert m["n_molecules"] == 3 and (tmp_path / "samples.xyz").is_file() and (tmp_path / "samples.sdf").is_file()
    # per-molecule results: SDF data fields (read back by RDKit) and molecules.csv carry the same rows
    with open(tmp_path / "molecules.csv") as f:
        rows = list(csv.DictReader(f))
    records = [mol.GetPropsAsDict() for mol in Chem.SDMolSupplier(str(tmp_path / "samples.sdf"), sanitize=False)]
    assert [r["index"] for r in rows] == ["0", "1", "2"] and len(records) == 3
    for row, rec in zip(rows, records, strict=True):
        assert {k: str(v) for k, v in rec.items()} == row
        assert row["sampler"] == f"{sampler}/4" and row["seed"] == "0" and int(row["nfe"]) > 0
    assert sum(int(r["molecule_stable"]) for r in rows) == round(3 * m["molecule_stability"])
    assert sum(int(r["connected"]) for r in rows) == round(3 * m["connected_validity"])


def test_load_denoiser_kinds(trained):
    _, cfg, out = trained
    ema, spec, header = load_denoiser(out / "last.eqx")
    raw, _, _ = load_denoiser(out / "last.eqx", which="model")
    assert spec == cfg.spec and header["kind"] == "train_state"
    # EMA and raw weights differ after training
    assert not np.allclose(ema.net.embedding.weight, raw.net.embedding.weight)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    pf = _recipe("pf_ode_sample")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pf.main(pf.Config(checkpoint=tmp_path / "nope.eqx", out_dir=tmp_path))


def test_sample_recipe_with_autoguidance(trained, tmp_path):
    """--guide.*: a guide identical to the model changes nothing (D_bad + w (D - D_bad) = D), bit for bit, at any
    weight; another guide changes the molecules and is recorded; a guide of another SDE, a weight without a
    guide and a missing guide file are refused with the flag named."""
    import equinox as eqx

    from sde_mol.run.build import build_sde_from
    from sde_mol.run.configs import GuideConfig, to_dict

    _, cfg, out = trained
    sample = _recipe("sample")
    base = sample.GenerateConfig(
        checkpoint=out / "best.eqx",
        sampler=SamplerConfig("reverse_sde", steps=4),
        n_samples=3,
        batch_size=3,
        buckets=(29,),
        out_dir=tmp_path / "plain",
        novelty=False,
    )
    sample.main(base)
    same = replace(base, guide=GuideConfig(out / "best.eqx", weight=3.0), out_dir=tmp_path / "self")
    sample.main(same)
    plain, selfg = (
        io.read_molecules(tmp_path / "plain" / "samples.sdf"),
        io.read_molecules(tmp_path / "self" / "samples.sdf"),
    )
    np.testing.assert_array_equal(plain[1], selfg[1])
    np.testing.assert_allclose(plain[0], selfg[0], atol=1e-4)  # SDF keeps 4 decimals
    raw = replace(base, guide=GuideConfig(out / "last.eqx", weight=3.0), which="model", out_dir=tmp_path / "raw")
    sample.main(raw)
    assert not np.allclose(io.read_molecules(tmp_path / "raw" / "samples.sdf")[0], plain[0], atol=1e-3)
    recorded = json.loads((tmp_path / "raw" / "config.json").read_text())["guide"]
    assert recorded == json.loads(json.dumps(to_dict(raw.guide), default=str))
    assert json.loads((tmp_path / "raw" / "metrics.json").read_text())["guide"] == recorded
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["guide"] is None
    # refused: a guide on another SDE (T = 200), a weight without a guide, a missing guide
    den, spec, header = load_denoiser(out / "best.eqx")
    other = tmp_path / "t200.eqx"
    t200 = replace(spec, sde=replace(spec.sde, timesteps=200))
    den200 = eqx.tree_at(lambda d: d.sde, den, build_sde_from(t200.sde))
    checkpoint.save(other, den200, kind="denoiser", config={"spec": to_dict(t200)})
    with pytest.raises(UsageError, match=r"--guide.checkpoint .*t200.eqx: its dataset / SDE .* differ"):
        sample.main(replace(base, guide=GuideConfig(other, weight=2.0), out_dir=tmp_path / "x"))
    # ... while on the continuous twins (--continuous-time) T = 200 and T = 1000 are the same process
    sample.main(replace(base, guide=GuideConfig(other, weight=2.0), continuous_time=True, out_dir=tmp_path / "twin"))
    assert json.loads((tmp_path / "twin" / "metrics.json").read_text())["n_molecules"] == 3
    foreign = tmp_path / "ae.eqx"
    checkpoint.save(foreign, {"w": np.zeros(2, np.float32)}, kind="autoencoder", config={"spec": to_dict(spec)})
    with pytest.raises(UsageError, match=r"--guide.checkpoint .*ae.eqx: its kind is 'autoencoder'"):
        sample.main(replace(base, guide=GuideConfig(foreign, weight=2.0), out_dir=tmp_path / "w"))
    with pytest.raises(UsageError, match="--guide.weight"):
        sample.main(replace(base, guide=GuideConfig(weight=2.0), out_dir=tmp_path / "y"))
    with pytest.raises(FileNotFoundError, match="--guide.checkpoint .*nope.eqx does not exist"):
        sample.main(replace(base, guide=GuideConfig(tmp_path / "nope.eqx", weight=2.0), out_dir=tmp_path / "z"))


def test_sample_recipe_default_guidance_belongs_to_the_default_model(trained, tmp_path, capsys):
    """recipes/sample.py guides the default model with its recommended guide (shipped files); another checkpoint is
    sampled unguided, with a note; --guide.checkpoint None turns the default guidance off; an explicit guide
    stays."""
    from sde_mol.run.configs import GuideConfig

    _, _, out = trained
    sample = _recipe("sample")
    assert sample.Config().guide == sample.RECOMMENDED_GUIDE and sample.RECOMMENDED_GUIDE.checkpoint.is_file()
    assert checkpoint.read_header(sample.RECOMMENDED_GUIDE.checkpoint)["kind"] == "denoiser"

    def resolved(cfg):
        capsys.readouterr()
        sample.main(replace(cfg, dry_run=True))
        text = capsys.readouterr().out
        return text, json.loads(text[text.index("{") :])["guide"]

    text, guide = resolved(sample.Config(checkpoint=out / "best.eqx"))
    assert "sampled unguided" in text and guide["checkpoint"] is None and guide["weight"] == 1.0
    off = replace(sample.RECOMMENDED_GUIDE, checkpoint=None)
    assert resolved(sample.Config(guide=off))[1] == {"checkpoint": None, "weight": 1.0, "t_low": 0.0, "t_high": None}
    mine = GuideConfig(out / "last.eqx", weight=2.0)
    assert resolved(sample.Config(checkpoint=out / "best.eqx", guide=mine))[1]["weight"] == 2.0
    assert resolved(sample.Config())[1]["weight"] == sample.RECOMMENDED_GUIDE.weight
    few = replace(sample.Config().sampler, steps=sample.FEWEST_GUIDED_STEPS - 1)
    assert "measured to help from" in resolved(sample.Config(sampler=few))[0]
    assert "measured to help from" not in resolved(sample.Config())[0]
