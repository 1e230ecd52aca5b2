"""Smoke tests (tiny configs, seconds) of the distillation and latent-diffusion recipes: progressive_distill.py
with an oracle teacher, with a tiny real checkpoint (interrupted and resumed) and with a latent teacher;
train_autoencoder.py; train_latent.py; sampling students and latent models through recipes/sample.py."""

import json
import os
import subprocess
from dataclasses import replace

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import pytest
from helpers import load_recipe

from sde_mol import checkpoint
from sde_mol.latent import AutoencoderConfig, load_autoencoder, load_latent
from sde_mol.objectives.distribution_matching import GeneratorPair
from sde_mol.run import recipe as rr
from sde_mol.run.build import build_denoiser
from sde_mol.run.configs import DataConfig, ModelConfig, ModelSpec, OptimConfig, SamplerConfig, to_dict
from sde_mol.run.load import load_denoiser
from sde_mol.run.progressive import TrajectoryConfig
from sde_mol.training.loop import LoopConfig
from sde_mol.training.state import init_state

TINY = ModelSpec(ModelConfig(hidden=8, n_layers=1))


_recipe = load_recipe


def _sample(checkpoint_path, out_dir, steps, eta=0.0):
    sample = _recipe("sample")
    cfg = sample.GenerateConfig(
        checkpoint=checkpoint_path,
        sampler=SamplerConfig("ddim", steps=steps, eta=eta),
        n_samples=3,
        batch_size=3,
        buckets=(),  # one compilation (size buckets would compile one sampler per width)
        out_dir=out_dir,
        novelty=False,
    )
    return sample.main(cfg)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny real (untrained) EDM checkpoint of kind denoiser."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.eqx"
    checkpoint.save(path, build_denoiser(TINY, key=jr.key(0)), kind="denoiser", config={"spec": to_dict(TINY)})
    return path


def _pd_config(pd, teacher, out_dir, **kw):
    base = pd.Config(
        teacher=str(teacher),
        rounds=2,
        teacher_steps=8,
        steps_per_round=2,
        data=DataConfig(batch_size=4, n_train=16, buckets=(20, 29)),
        train=LoopConfig(log_every=1, ckpt_every=2),
        spec=TINY,
        out_dir=out_dir,
    )
    return replace(base, **kw)


def test_progressive_distill_oracle_teacher(tmp_path, monkeypatch):
    """An exact-oracle teacher, two rounds; every round ends by dropping the compiled programs (a long run would
    otherwise run out of memory mappings, sde_mol/run/progressive.py `finish_round`)."""
    pd = _recipe("progressive_distill")
    cfg = _pd_config(pd, "oracle:4", tmp_path, oracle_atoms=9, oracle_rotations=2)
    cleared, clear = [], jax.clear_caches
    monkeypatch.setattr(jax, "clear_caches", lambda: (cleared.append(1), clear()))
    rows = pd.main(cfg)
    assert [r["student_steps"] for r in rows] == [4, 2] and len(cleared) == 2
    for n in (4, 2):
        header = checkpoint.read_header(tmp_path / f"student_{n}steps.eqx")
        assert header["kind"] == "denoiser"
        dist = header["config"]["distillation"]
        assert dist["student_steps"] == n and dist["sampler"] == {**to_dict(SamplerConfig("ddim", steps=n))}
        assert header["config"]["spec"]["sde"]["name"] == "vp_discrete"
    assert len((tmp_path / "students.json").read_text().splitlines()) == 2
    state_header = checkpoint.read_header(tmp_path / "last.eqx")
    assert state_header["kind"] == "progressive_train_state" and state_header["step"] == 4
    # a student round-trips through the checkpoint loader and samples at its own step count
    den, spec, _ = load_denoiser(tmp_path / "student_2steps.eqx")
    assert spec == TINY
    m = _sample(tmp_path / "student_2steps.eqx", tmp_path / "samples", steps=2)
    assert m["n_molecules"] == 3 and m["nfe"] == 3


def test_progressive_distill_real_checkpoint(tiny_teacher, tmp_path):
    """A checkpoint teacher: the student starts as a copy of it (same structure, header spec) and moves; the
    student's header records the loss weighting (--eps-below-snr) and the share of chain states (--trajectory:
    every other step here, so the teacher's chains run beside the donating training step)."""
    pd = _recipe("progressive_distill")
    traj = TrajectoryConfig(fraction=0.5, reuse=2)
    cfg = _pd_config(pd, tiny_teacher, tmp_path, rounds=1, teacher_steps=4, steps_per_round=4, eps_below_snr=0.01)
    rows = pd.main(replace(cfg, trajectory=traj))
    assert [r["student_steps"] for r in rows] == [2]
    teacher, teacher_spec, _ = load_denoiser(tiny_teacher)
    student, spec, header = load_denoiser(tmp_path / "student_2steps.eqx")
    assert (
        spec == teacher_spec
        and header["step"] == 4
        and header["config"]["distillation"]["teacher"] == str(tiny_teacher)
        and header["config"]["distillation"]["eps_below_snr"] == 0.01
        and header["config"]["distillation"]["trajectory"] == to_dict(traj)
    )
    assert student.net.embedding.weight.shape == teacher.net.embedding.weight.shape
    assert not np.array_equal(student.net.embedding.weight, teacher.net.embedding.weight)
    # recipes/sample.py with no sampler flags samples a student with its own sampler (DDIM, 2 steps)
    sample = _recipe("sample")
    out = sample.main(
        sample.GenerateConfig(tmp_path / "student_2steps.eqx", n_samples=3, batch_size=3, buckets=(), novelty=False,
                              out_dir=tmp_path / "own", quiet=True)
    )  # fmt: skip
    assert out["sampler"]["sampler"] == "ddim" and out["sampler"]["steps"] == 2 and out["nfe"] == 3


def test_progressive_distill_guided_teacher(tiny_teacher, tmp_path):
    """--guide.*: round 0 distils the autoguided teacher. Guided by itself (D_bad + w (D - D_bad) = D) the student
    is bit for bit the unguided run's; guided by another model it differs; the header records the guide."""
    from sde_mol.run.configs import GuideConfig

    pd = _recipe("progressive_distill")
    other = tmp_path / "guide.eqx"
    checkpoint.save(other, build_denoiser(TINY, key=jr.key(5)), kind="denoiser", config={"spec": to_dict(TINY)})
    cfg = _pd_config(pd, tiny_teacher, tmp_path, rounds=1, teacher_steps=4, steps_per_round=2)
    students = {}
    for name, guide in (
        ("plain", GuideConfig()),
        ("self", GuideConfig(tiny_teacher, 3.0)),
        ("other", GuideConfig(other, 3.0)),
    ):
        pd.main(replace(cfg, guide=guide, out_dir=tmp_path / name))
        students[name], _, header = load_denoiser(tmp_path / name / "student_2steps.eqx")
        assert header["config"]["distillation"]["guide"] == json.loads(json.dumps(to_dict(guide), default=str))
    leaves = {k: jax.tree.leaves(v.net) for k, v in students.items()}
    assert all(np.array_equal(a, b) for a, b in zip(leaves["plain"], leaves["self"], strict=True))
    assert not all(np.allclose(a, b) for a, b in zip(leaves["plain"], leaves["other"], strict=True))


def test_progressive_distill_continuous_time_goes_past_the_discrete_table(tiny_teacher, tmp_path):
    """--continuous-time: a 2048-step teacher on the continuous twin of EDM's 1000-level table (refused without
    the flag, see below); the student records vp_polynomial and samples on it. --eval-max-steps skips scoring
    the 1024-step student."""
    pd = _recipe("progressive_distill")
    cfg = _pd_config(
        pd, tiny_teacher, tmp_path, rounds=1, teacher_steps=2048, continuous_time=True, eval_samples=2,
        eval_max_steps=512,
    )  # fmt: skip
    rows = pd.main(cfg)
    assert [r["student_steps"] for r in rows] == [1024] and "validity" not in rows[0]
    student, spec, header = load_denoiser(tmp_path / "student_1024steps.eqx")
    assert spec.sde.name == "vp_polynomial" and type(student.sde).__name__ == "PolynomialVPSDE"
    assert header["config"]["full"]["continuous_time"] is True


@pytest.mark.slow
def test_progressive_distill_resumes_and_scores(tiny_teacher, tmp_path, capsys):
    pd = _recipe("progressive_distill")
    cfg = _pd_config(pd, tiny_teacher, tmp_path, eval_samples=3)
    # the wall-clock budget runs out after the first step: last.eqx, no student yet
    assert pd.main(replace(cfg, train=replace(cfg.train, max_minutes=1e-9))) == []
    assert checkpoint.read_header(tmp_path / "last.eqx")["step"] == 1
    assert not (tmp_path / "student_4steps.eqx").exists()
    rows = pd.main(replace(cfg, resume=tmp_path / "last.eqx"))
    assert [r["student_steps"] for r in rows] == [4, 2]
    assert all(0 <= r["validity"] <= 1 and 0 <= r["atom_stability"] <= 1 for r in rows)
    # the probe: round 1's teacher is round 0's student, read back from students.json (same molecules)
    assert rows[1]["teacher_probe"] == {k: rows[0][k] for k in ("atom_stability", "molecule_stability", "validity")}
    assert set(rows[0]["teacher_probe"]) == {"atom_stability", "molecule_stability", "validity"}
    assert all(isinstance(r["matched_teacher"], bool) for r in rows)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert checkpoint.read_header(tmp_path / "student_2steps.eqx")["step"] == 4
    # a different schedule cannot resume this run
    with pytest.raises(ValueError, match="steps_per_round"):
        pd.main(replace(cfg, steps_per_round=3, resume=tmp_path / "last.eqx"))
    capsys.readouterr()
    _sample(tmp_path / "student_4steps.eqx", tmp_path / "s", steps=8)  # other step counts run, with a note
    assert "distilled 4-step student" in capsys.readouterr().out


def test_progressive_distill_rejects_bad_inputs(tiny_teacher, tmp_path):
    pd = _recipe("progressive_distill")
    cfg = _pd_config(pd, tiny_teacher, tmp_path)
    with pytest.raises(ValueError, match="divisible by 2\\^n_rounds"):
        pd.main(replace(cfg, teacher_steps=12, rounds=3))
    with pytest.raises(ValueError, match="oracle:<n>"):
        pd.main(replace(cfg, teacher="oracle:many"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pd.main(replace(cfg, teacher=str(tmp_path / "missing.eqx")))
    with pytest.raises(ValueError, match="finer than the teacher's discrete schedule.*--continuous-time"):
        pd.main(replace(cfg, teacher_steps=2048))
    assert pd.main(replace(cfg, dry_run=True)) == []


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    tae = _recipe("train_autoencoder")
    out = tmp_path_factory.mktemp("ae")
    cfg = tae.Config(
        ae=AutoencoderConfig(latent_channels=2, hidden=8, decoder_layers=1),
        data=DataConfig(batch_size=8, n_train=32, buckets=(20, 29)),
        train=LoopConfig(steps=4, log_every=2, eval_every=4, ckpt_every=2),
        n_valid=8,
        out_dir=out,
    )
    result = tae.main(cfg)
    return tae, cfg, out, result


def test_train_autoencoder_recipe(autoencoder_run):
    tae, cfg, out, result = autoencoder_run
    assert 0 <= result["type_accuracy"] <= 1 and result["rmsd"] >= 0 and np.isfinite(result["val_recon"])
    assert checkpoint.read_header(out / "autoencoder.eqx")["kind"] == "autoencoder"
    assert checkpoint.read_header(out / "last.eqx")["kind"] == "autoencoder_train_state"
    ae, _ = load_autoencoder(out / "autoencoder.eqx")
    ae_state, _ = load_autoencoder(out / "last.eqx")  # the train state's EMA model
    np.testing.assert_array_equal(ae.net.decoder_head.weight, ae_state.net.decoder_head.weight)
    assert ae.latent_channels == 2
    tae.main(replace(cfg, resume=out / "last.eqx", train=replace(cfg.train, steps=6)))
    assert checkpoint.read_header(out / "autoencoder.eqx")["step"] == 6
    with pytest.raises(ValueError, match="autoencoder config"):
        tae.main(replace(cfg, resume=out / "last.eqx", ae=AutoencoderConfig(latent_channels=3)))


@pytest.fixture(scope="module")
def latent_run(autoencoder_run, tmp_path_factory):
    _, _, ae_dir, _ = autoencoder_run
    tmp_path = tmp_path_factory.mktemp("latent")
    tl = _recipe("train_latent")
    cfg = tl.Config(
        autoencoder=ae_dir / "autoencoder.eqx",
        spec=TINY,
        data=DataConfig(batch_size=8, n_train=32, buckets=(20, 29)),
        train=LoopConfig(steps=3, log_every=1, eval_every=3, ckpt_every=3),
        n_valid=8,
        eval_samples=3,
        eval_sampler=SamplerConfig("ddim", steps=2),
        out_dir=tmp_path / "ldm",
    )
    tl.main(cfg)
    return tmp_path


def test_train_latent_and_sample(latent_run, tmp_path):
    header = checkpoint.read_header(latent_run / "ldm" / "last.eqx")
    assert header["kind"] == "latent_train_state" and header["step"] == 3
    lines = (latent_run / "ldm" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(x)["eval"] for x in lines if "eval" in x]
    assert np.isfinite(evals[-1]["val_loss"]) and 0 <= evals[-1]["validity"] <= 1
    den, ae, spec, _ = load_latent(latent_run / "ldm" / "last.eqx")
    assert spec == TINY and den.net.n_feat == ae.latent_channels == 2
    # sampling decodes the latents: sample.py sees ordinary molecules
    m = _sample(latent_run / "ldm" / "last.eqx", tmp_path / "samples", steps=3)
    assert m["n_molecules"] == 3 and m["nfe"] == 4


@pytest.mark.slow
def test_latent_progressive_distillation(latent_run, tmp_path):
    """A latent teacher gives latent students (with the autoencoder embedded) that sample.py decodes."""
    pd = _recipe("progressive_distill")
    pd_cfg = _pd_config(pd, latent_run / "ldm" / "last.eqx", tmp_path / "pd", rounds=1, teacher_steps=4)
    pd.main(replace(pd_cfg, sampler="ddpm", target="ddpm"))
    student_path = tmp_path / "pd" / "student_2steps.eqx"
    assert checkpoint.read_header(student_path)["kind"] == "latent_denoiser"
    assert checkpoint.read_header(student_path)["config"]["distillation"]["sampler"]["eta"] == 1.0
    m = _sample(student_path, tmp_path / "samples2", steps=2, eta=1.0)
    assert m["n_molecules"] == 3 and m["nfe"] == 3


def test_latent_recipe_needs_an_autoencoder(tmp_path):
    tl = _recipe("train_latent")
    with pytest.raises(FileNotFoundError, match="train_autoencoder"):
        tl.main(tl.Config(autoencoder=tmp_path / "none.eqx", out_dir=tmp_path))


@pytest.mark.slow
def test_nfe_table_and_pd_levels_on_a_tiny_run(tiny_teacher, tmp_path):
    """experiments/nfe_table.sh: training-free rows of the teacher and a student's row, one table; and
    experiments/pd_levels.py on that student against its teacher: one row per student step."""
    from helpers import ROOT, load_script

    pd = _recipe("progressive_distill")
    cfg = _pd_config(pd, tiny_teacher, tmp_path / "pd", rounds=1, teacher_steps=4, continuous_time=True)
    pd.main(cfg)
    student = tmp_path / "pd" / "student_2steps.eqx"
    env = dict(os.environ, N="3", STEPS="2", RECOMMENDED="0")
    out = tmp_path / "table"
    subprocess.run(
        ["bash", str(ROOT / "experiments" / "nfe_table.sh"), str(tiny_teacher), str(out), str(student)],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    lines = (out / "table.md").read_text().splitlines()[2:]
    methods = sorted(line.split(" | ")[1] for line in lines)
    assert methods == [
        "pd", "teacher, DDIM", "teacher, PF-ODE heun (Karras)", "teacher, respaced ancestral",
        "teacher, respaced ancestral (Karras grid)",
    ]  # fmt: skip
    assert all(line.endswith("| 3 |") for line in lines)  # every row scored its 3 molecules
    levels = load_script(ROOT / "experiments" / "pd_levels.py", "pd_levels")
    report = levels.main(levels.Config(student=student, teacher=tiny_teacher, continuous_time=True, n_valid=4))
    assert [r["t"] for r in report["levels"]] == [1.0, 0.5] and report["student_steps"] == 2
    keys = ("distill", "student_x0", "target_x0", "distill_trajectory")
    assert all(np.isfinite(r[k]) and r[k] >= 0 for r in report["levels"] for k in keys)
    # experiments/first_step.py: the student and the teacher, each plain and with its first interval done by
    # 4 teacher substeps (NFE: N + 1, then 4 + (N - 1) + 1)
    first = load_script(ROOT / "experiments" / "first_step.py", "first_step")
    rows = first.main(
        first.Config(models=(str(student), "teacher"), teacher_steps=(2,), teacher=tiny_teacher, top_substeps=4,
                     n_samples=3)
    )  # fmt: skip
    assert [(r["model"] == "teacher", r["steps"], r["top_substeps"]) for r in rows] == [
        (False, 2, 0), (False, 2, 4), (True, 2, 0), (True, 2, 4)
    ]  # fmt: skip
    assert [r["nfe"] for r in rows] == [3, 6, 3, 6] and all(0 <= r["atom_stability"] <= 1 for r in rows)


def test_dmd_distill_trains_both_networks_resumes_and_samples(tiny_teacher, tmp_path, capsys):
    """dmd_distill.py: the 2-step generator moves from the teacher's weights; an
    interrupted run resumes to the same step count; other settings cannot resume it; the student's header makes
    recipes/sample.py use DDIM eta 1 at its 2 steps; bad levels are refused before anything is written."""
    from sde_mol.cli import UsageError
    from sde_mol.run.configs import GuideConfig

    dmd = _recipe("dmd_distill")
    cfg = dmd.Config(
        teacher=tiny_teacher,
        steps=2,
        data=DataConfig(batch_size=4, n_train=16, buckets=(20, 29)),
        train=LoopConfig(steps=3, log_every=1, ckpt_every=1, eval_at_start=True),
        optim=OptimConfig(lr=1e-3, ema_decay=0.0, clip="1.0"),
        eval_samples=2,
        out_dir=tmp_path / "run",
    )
    dmd.main(replace(cfg, train=replace(cfg.train, max_minutes=1e-9)))  # stops after one step
    assert checkpoint.read_header(tmp_path / "run" / "last.eqx")["step"] == 1
    result = dmd.main(replace(cfg, resume=tmp_path / "run" / "last.eqx"))
    assert result["step"] == 3 and 0 <= result["student_metrics"]["atom_stability"] <= 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dmd" in r] == [1, 2, 3]
    assert all(np.isfinite(r["fake"]) for r in rows if "fake" in r)
    # the curve: the generator before training (the teacher's chain) and at the last step, same molecules
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [0, 3] and all(0 <= r["eval"]["validity"] <= 1 for r in evals)
    teacher, _, _ = load_denoiser(tiny_teacher)
    student, spec, header = load_denoiser(tmp_path / "run" / "student_2steps.eqx")
    assert spec.sde.name == "vp_polynomial"
    own = to_dict(SamplerConfig("ddim", steps=2, eta=1.0, grid="karras"))
    assert header["config"]["distillation"]["sampler"] == own
    assert not all(
        np.allclose(a, b) for a, b in zip(jax.tree.leaves(student.net), jax.tree.leaves(teacher.net), strict=True)
    )
    with pytest.raises(ValueError, match="steps"):
        dmd.main(replace(cfg, steps=4, resume=tmp_path / "run" / "last.eqx"))
    # carry.eqx: the state less the fake's EMA and optimiser moments; resuming from it restores the generator's
    # weights, EMA and optimiser state exactly and restarts the fake's optimiser
    last, carried = tmp_path / "run" / "last.eqx", tmp_path / "run" / "carry.eqx"
    assert carried.stat().st_size < 0.7 * last.stat().st_size
    twin = rr.checkpoint_teacher(tiny_teacher, continuous_time=True, latent_ok=False)[0]  # what the recipe trains
    pair = GeneratorPair(twin, twin)
    state, back = dmd.load_state(last, pair), dmd.load_state(carried, pair)
    fresh = init_state(pair, dmd.optimizer_for(cfg.optim, cfg.fake_lr_scale))

    def same(a, b):
        leaves_a, leaves_b = (jax.tree.leaves(eqx.filter(tree, eqx.is_array)) for tree in (a, b))
        return len(leaves_a) == len(leaves_b) and all(map(np.array_equal, leaves_a, leaves_b))

    assert int(back.step) == int(state.step) == 3
    assert same(back.model, state.model) and same(back.ema_model.generator, state.ema_model.generator)
    assert same(back.opt_state.inner_states["generator"], state.opt_state.inner_states["generator"])
    assert same(back.opt_state.inner_states["fake"], fresh.opt_state.inner_states["fake"])
    assert not same(state.opt_state.inner_states["fake"], fresh.opt_state.inner_states["fake"])
    assert same(back.ema_model.fake, state.model.fake)
    assert same(state.ema_model.generator.net, student.net)  # the student is the EMA generator
    with pytest.raises(ValueError, match="steps"):
        dmd.main(replace(cfg, steps=4, resume=carried))
    # the teacher is known by its content: a copy elsewhere continues the run
    (tmp_path / "moved").mkdir()
    moved_teacher = tmp_path / "moved" / "teacher.eqx"
    moved_teacher.write_bytes(tiny_teacher.read_bytes())
    moved = dmd.main(replace(cfg, teacher=moved_teacher, resume=carried, train=replace(cfg.train, steps=4)))
    assert moved["step"] == 4 and checkpoint.read_header(carried)["step"] == 4
    # --init-from: the networks of a run start another with other levels (new optimiser, step 0, its start scored)
    low = replace(cfg, low_noise_fraction=0.5, low_noise_t_max=0.1, t_low=0.01, out_dir=tmp_path / "low")
    with pytest.raises(ValueError, match="differs from the requested"):  # other levels: another run
        dmd.main(replace(low, out_dir=tmp_path / "run", resume=carried))
    dmd.main(replace(low, init_from=carried, train=replace(cfg.train, steps=1)))
    rows = [json.loads(x) for x in (tmp_path / "low" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" in r] == [0, 1]
    started = dmd.load_state(tmp_path / "low" / "last.eqx", pair)
    assert int(started.step) == 1
    assert checkpoint.read_header(tmp_path / "low" / "last.eqx")["config"]["distillation"]["low_noise_fraction"] == 0.5
    sample = _recipe("sample")
    capsys.readouterr()
    sample.main(
        sample.GenerateConfig(
            checkpoint=tmp_path / "run" / "student_2steps.eqx", n_samples=2, batch_size=2, buckets=(),
            out_dir=tmp_path / "s", novelty=False,
        )
    )  # fmt: skip
    assert "own sampler: ddim, 2 steps, eta 1.0" in capsys.readouterr().out  # on its Karras grid
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["nfe"] == 3
    for bad in ({"steps": 0}, {"t_low": 0.5, "t_high": 0.4}):
        with pytest.raises(UsageError, match="--steps"):
            dmd.main(replace(cfg, out_dir=tmp_path / "bad", **bad))
    for bad in ({"low_noise_fraction": 1.5}, {"low_noise_fraction": 0.5, "low_noise_t_max": 0.01}):
        with pytest.raises(UsageError, match="--low-noise-fraction"):
            dmd.main(replace(cfg, out_dir=tmp_path / "bad", **bad))
    with pytest.raises(UsageError, match="exclude"):
        dmd.main(replace(cfg, out_dir=tmp_path / "bad", resume=carried, init_from=carried))
    with pytest.raises(UsageError, match="--init-from"):
        dmd.main(replace(cfg, out_dir=tmp_path / "bad", init_from=tmp_path / "missing.eqx"))
    with pytest.raises(UsageError, match="--guide.checkpoint"):
        dmd.main(replace(cfg, out_dir=tmp_path / "bad", guide=GuideConfig(weight=3.0)))
    with pytest.raises(FileNotFoundError, match="--teacher"):
        dmd.main(replace(cfg, out_dir=tmp_path / "bad", teacher=tmp_path / "missing.eqx"))
    assert not (tmp_path / "bad").exists()


def test_sample_levels_probe_compares_molecules_with_the_data(tiny_teacher, tmp_path):
    """experiments/sample_levels.py: the validation molecules themselves, read back from an SDF, give the data's
    errors (ratio 1 at every level, up to the file's 4 decimals); a set with one atom placed 300 A out counts one
    spread-out molecule; the report has one row per level."""
    from helpers import ROOT, load_script

    from sde_mol.data.qm9 import load_qm9
    from sde_mol.io import write_sdf

    valid = load_qm9("valid").subset(slice(0, 6))
    write_sdf(tmp_path / "copy.sdf", valid.centred_positions(), valid.atom_types)
    far = valid.centred_positions().copy()
    far[2, 0] += 300.0
    write_sdf(tmp_path / "far.sdf", far, valid.atom_types)
    probe = load_script(ROOT / "experiments" / "sample_levels.py", "sample_levels")
    levels = (0.01, 0.5)
    report = probe.main(
        probe.Config(samples=(tmp_path / "copy.sdf", tmp_path / "far.sdf"), teacher=tiny_teacher, levels=levels,
                     n_valid=6, chunk=4)
    )  # fmt: skip
    copy, far_key = str(tmp_path / "copy.sdf"), str(tmp_path / "far.sdf")
    assert report["spread_out"] == {"qm9/valid": 0, copy: 0, far_key: 1}
    np.testing.assert_allclose(report["median_ratio_to_data"][copy], 1.0, rtol=1e-2)
    np.testing.assert_allclose(report["mean_ratio_to_data"][copy], 1.0, rtol=1e-2)
    assert len(report["eps_mse_median"][far_key]) == len(levels)
    assert report["mean_ratio_to_data"][far_key] != report["mean_ratio_to_data"][copy]
