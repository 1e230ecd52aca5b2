"""Smoke tests (tiny configs, seconds) of recipes/consistency_distill.py and recipes/consistency_train.py: an oracle
teacher, a tiny real EDM checkpoint (discrete schedule -> continuous twin, ECT initialisation, interrupted and
resumed), CT on fixed molecules with both curricula, truncated (TCM) stage-2 runs of both recipes on a stage-1
student, and sampling every produced checkpoint through recipes/sample.py with the one- and two-step consistency
sampler."""

import json
from dataclasses import replace

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import pytest
from helpers import load_recipe

from sde_mol import checkpoint
from sde_mol.denoisers import ConsistencyFunction, EpsConsistencyFunction, TruncatedConsistencyFunction
from sde_mol.run.build import build_denoiser
from sde_mol.run.configs import DataConfig, DenoiserConfig, ModelConfig, ModelSpec, SamplerConfig, SDEConfig, to_dict
from sde_mol.run.load import load_denoiser
from sde_mol.sde import PolynomialVPSDE
from sde_mol.training.loop import LoopConfig

TINY_EDM = ModelSpec(ModelConfig(hidden=8, n_layers=1))  # EDM's discrete schedule, eps parametrisation
TINY_CM = ModelSpec(ModelConfig(hidden=8, n_layers=1), SDEConfig("vp_polynomial"), DenoiserConfig("consistency"))


_recipe = load_recipe


def _sample(checkpoint_path, out_dir, steps):
    sample = _recipe("sample")
    cfg = sample.GenerateConfig(
        checkpoint=checkpoint_path,
        sampler=SamplerConfig("consistency", steps=steps),
        n_samples=3,
        batch_size=3,
        buckets=(),
        out_dir=out_dir,
        novelty=False,
    )
    return sample.main(cfg)


def _common(out_dir, **kw):
    return dict(
        optim=replace(_recipe("consistency_distill").Config().optim, ema_decay=0.5),
        data=DataConfig(batch_size=4, n_train=16, buckets=(20, 29)),
        train=LoopConfig(steps=3, log_every=1, ckpt_every=2),
        spec=TINY_CM,
        out_dir=out_dir,
        **kw,
    )


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny real (untrained) EDM checkpoint: kind denoiser, DiscreteVPSDE."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.eqx"
    checkpoint.save(path, build_denoiser(TINY_EDM, key=jr.key(0)), kind="denoiser", config={"spec": to_dict(TINY_EDM)})
    return path


def _check_outputs(out_dir, method, steps):
    state_header = checkpoint.read_header(out_dir / "last.eqx")
    student_header = checkpoint.read_header(out_dir / "student.eqx")
    assert state_header["kind"] == "train_state" and state_header["step"] == steps
    assert student_header["kind"] == "denoiser" and student_header["step"] == steps
    for header in (state_header, student_header):
        entry = header["config"]["consistency"]
        assert entry["method"] == method and entry["sampler"] == to_dict(SamplerConfig("consistency", steps=1))
        assert header["config"]["spec"]["sde"]["name"] == "vp_polynomial"
    assert (out_dir / "config.json").is_file() and (out_dir / "result.json").is_file()
    logged = [json.loads(x)["step"] for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == steps


def test_consistency_distill_oracle_teacher(tmp_path):
    cd = _recipe("consistency_distill")
    cfg = cd.Config(teacher="oracle:4", oracle_atoms=9, oracle_rotations=2, n_points=6, **_common(tmp_path))
    result = cd.main(cfg)
    assert result["step"] == 3
    _check_outputs(tmp_path, "cd", 3)
    # both files rebuild the consistency function (the train state's EMA model) and sample in 1 and 2 steps
    for name in ("last.eqx", "student.eqx"):
        den, spec, _ = load_denoiser(tmp_path / name)
        assert isinstance(den, ConsistencyFunction) and isinstance(den.sde, PolynomialVPSDE) and spec == TINY_CM
    for steps in (1, 2):
        m = _sample(tmp_path / "last.eqx", tmp_path / f"s{steps}", steps)
        assert m["n_molecules"] == 3 and m["nfe"] == steps


def test_consistency_distill_real_checkpoint_resumes(tiny_teacher, tmp_path, capsys):
    """An EDM teacher: the student is an EpsConsistencyFunction on the teacher's weights (ECT) and the continuous
    twin of its discrete schedule; a run stopped by its budget resumes to the same end step."""
    cd = _recipe("consistency_distill")
    cfg = cd.Config(teacher=str(tiny_teacher), solver="euler", n_points=8, **_common(tmp_path))
    cd.main(replace(cfg, train=replace(cfg.train, max_minutes=1e-9)))  # stops after the first step
    assert checkpoint.read_header(tmp_path / "last.eqx")["step"] == 1
    cd.main(replace(cfg, resume=tmp_path / "last.eqx"))
    _check_outputs(tmp_path, "cd", 3)
    teacher, _, _ = load_denoiser(tiny_teacher)
    student, spec, header = load_denoiser(tmp_path / "student.eqx")
    assert isinstance(student, EpsConsistencyFunction) and isinstance(student.sde, PolynomialVPSDE)
    assert spec.denoiser.parametrisation == "eps_consistency" and spec.model == TINY_EDM.model
    assert header["config"]["consistency"]["solver"] == "euler"
    assert student.net.embedding.weight.shape == teacher.net.embedding.weight.shape
    assert not np.array_equal(student.net.embedding.weight, teacher.net.embedding.weight)
    with pytest.raises(ValueError, match="n_points"):
        cd.main(replace(cfg, n_points=9, resume=tmp_path / "last.eqx"))
    capsys.readouterr()
    m = _sample(tmp_path / "student.eqx", tmp_path / "s", 2)
    assert m["n_molecules"] == 3 and m["nfe"] == 2 and "note:" not in capsys.readouterr().out
    sample = _recipe("sample")  # another sampler runs, with a note
    ddim = SamplerConfig("ddim", steps=2)
    sample.main(sample.GenerateConfig(tmp_path / "student.eqx", ddim, n_samples=3, batch_size=3, buckets=(),
                                      out_dir=tmp_path / "d", novelty=False))  # fmt: skip
    assert "consistency model" in capsys.readouterr().out


@pytest.mark.parametrize("curriculum", ["ict", "song"])
def test_consistency_train_fixed_molecules(curriculum, tmp_path):
    ct = _recipe("consistency_train")
    cfg = ct.Config(
        curriculum=curriculum,
        molecules="fixed:4",
        fixed_atoms=9,
        fixed_rotations=2,
        n_min=2,
        n_max=8,
        **_common(tmp_path),
    )
    ct.main(cfg)
    _check_outputs(tmp_path, "ct", 3)
    header = checkpoint.read_header(tmp_path / "last.eqx")
    assert header["config"]["with_target"] == (curriculum == "song")
    assert header["config"]["consistency"]["curriculum"] == curriculum
    for steps in (1, 2):
        m = _sample(tmp_path / "student.eqx", tmp_path / f"s{steps}", steps)
        assert m["n_molecules"] == 3 and m["nfe"] == steps


def test_consistency_train_qm9_and_bad_inputs(tiny_teacher, tmp_path):
    ct = _recipe("consistency_train")
    cfg = ct.Config(init_from=tiny_teacher, eval_samples=3, eval_steps=(1,), **_common(tmp_path))
    result = ct.main(cfg)
    assert 0 <= result["1_step"]["validity"] <= 1
    student, spec, _ = load_denoiser(tmp_path / "last.eqx")
    assert isinstance(student, EpsConsistencyFunction) and spec.sde.name == "vp_polynomial"
    with pytest.raises(ValueError, match="curriculum"):
        ct.main(replace(cfg, curriculum="song", resume=tmp_path / "last.eqx"))
    with pytest.raises(ValueError, match="n-min"):
        ct.main(replace(cfg, n_min=20, n_max=8))
    with pytest.raises(ValueError, match="qm9 or fixed"):
        ct.main(replace(cfg, init_from=None, molecules="all"))
    with pytest.raises(ValueError, match="continuous-time"):
        ct.main(replace(cfg, init_from=None, spec=replace(TINY_CM, sde=SDEConfig("vp_discrete"))))
    with pytest.raises(ValueError, match="consistency student"):
        ct.main(replace(cfg, init_from=None, spec=replace(TINY_CM, denoiser=DenoiserConfig("eps"))))
    assert ct.main(replace(cfg, dry_run=True)) == {}


def test_consistency_distill_bad_inputs(tmp_path):
    cd = _recipe("consistency_distill")
    cfg = cd.Config(teacher="oracle:4", oracle_atoms=9, **_common(tmp_path))
    with pytest.raises(ValueError, match="oracle:<n>"):
        cd.main(replace(cfg, teacher="oracle:many"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cd.main(replace(cfg, teacher=str(tmp_path / "missing.eqx")))
    with pytest.raises(ValueError, match="no network to copy"):
        cd.main(replace(cfg, init="teacher"))
    with pytest.raises(ValueError, match="n-points"):
        cd.main(replace(cfg, n_points=1))
    assert cd.main(replace(cfg, dry_run=True)) == {}


def _same_arrays(a, b) -> bool:
    la, lb = (jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in (a, b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def test_truncated_stage_two_of_both_recipes(tmp_path):
    """TCM: a stage-1 CD student as --boundary of a CD and a CT stage-2 run. The stage-2 student starts from the
    stage-1 network; student.eqx is the joined model (stage-1 network below s', the trained one above), which
    loads back from its spec and samples in 1 and 2 steps; last.eqx holds the stage-2 network alone (the CT run
    with a fixed boundary share, --loss.boundary-fraction, which a run without --boundary refuses)."""
    cd, ct = _recipe("consistency_distill"), _recipe("consistency_train")
    base = dict(teacher="oracle:4", oracle_atoms=9, oracle_rotations=2, n_points=6)
    first = cd.Config(**base, **_common(tmp_path / "stage1"))
    with pytest.raises(ValueError, match="boundary-fraction 0.2 applies to truncated training only"):
        cd.main(replace(first, loss=replace(first.loss, boundary_fraction=0.2)))
    cd.main(first)
    stage1, _, _ = load_denoiser(tmp_path / "stage1" / "student.eqx")
    fixed = dict(molecules="fixed:4", fixed_atoms=9, fixed_rotations=2, n_min=2, n_max=8)
    runs = {
        "cd": (cd, cd.Config(**base, boundary=tmp_path / "stage1" / "student.eqx", truncation_sigma=0.2,
                             **_common(tmp_path / "cd2"))),
        "ct": (ct, ct.Config(**fixed, boundary=tmp_path / "stage1" / "student.eqx", truncation_sigma=0.2,
                             loss=replace(ct.Config().loss, index="uniform", boundary_fraction=0.25),
                             **_common(tmp_path / "ct2"))),
    }  # fmt: skip
    for method, (recipe, cfg) in runs.items():
        recipe.main(cfg)
        _check_outputs(cfg.out_dir, method, 3)
        joined, spec, header = load_denoiser(cfg.out_dir / "student.eqx")
        assert isinstance(joined, TruncatedConsistencyFunction) and joined.sigma == 0.2
        assert spec.denoiser.truncation_sigma == 0.2 and header["config"]["consistency"]["truncation_sigma"] == 0.2
        assert _same_arrays(joined.low, stage1) and not _same_arrays(joined.high, stage1)
        high, plain_spec, _ = load_denoiser(cfg.out_dir / "last.eqx")
        assert isinstance(high, ConsistencyFunction) and plain_spec.denoiser.truncation_sigma is None
        for steps in (1, 2):
            m = _sample(cfg.out_dir / "student.eqx", cfg.out_dir / f"s{steps}", steps)
            assert m["n_molecules"] == 3 and m["nfe"] == steps
    cfg = runs["cd"][1]
    with pytest.raises(ValueError, match="truncation-sigma"):
        cd.main(replace(cfg, truncation_sigma=None))
    with pytest.raises(ValueError, match="must lie in"):
        cd.main(replace(cfg, truncation_sigma=1e4))
    with pytest.raises(ValueError, match="loss.index uniform"):
        cd.main(replace(cfg, loss=replace(cfg.loss, index="lognormal")))
    with pytest.raises(ValueError, match="already truncated"):
        cd.main(replace(cfg, boundary=cfg.out_dir / "student.eqx"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cd.main(replace(cfg, boundary=tmp_path / "missing.eqx"))
    with pytest.raises(ValueError, match="truncation_sigma"):
        cd.main(replace(cfg, truncation_sigma=0.3, resume=cfg.out_dir / "last.eqx"))
