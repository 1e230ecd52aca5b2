"""Smoke tests of tools/benchmark.py: it runs, prints a table and ONE JSON object, and its figures are
consistent with themselves (no timing assertions: speed targets live in the benchmark's output only)."""

import json

import pytest
from helpers import load_tool


@pytest.fixture(scope="module")
def bench():
    return load_tool("benchmark")


def _run(bench, capsys, tmp_path, **kw):
    cfg = bench.Config(configs=("qm9-small",), repeats=1, sample_repeats=1, json_out=tmp_path / "b.json", **kw)
    report = bench.main(cfg)
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(report, default=float))  # the last line is the JSON
    assert json.loads((tmp_path / "b.json").read_text())["results"].keys() == {"qm9-small"}
    assert any("qm9-small" in line for line in out[:-1])  # and a readable table before it
    return report["results"]["qm9-small"]


def test_denoiser_and_sampling_sections(bench, capsys, tmp_path):
    res = _run(
        bench,
        capsys,
        tmp_path,
        which=("denoiser", "sample"),
        batch_size=4,
        buckets=(29,),  # one width: one compilation per sampler and step count
        sample_molecules=6,
        ancestral_steps=4,
        pf_ode_steps=2,
    )
    assert res["params"] == 151_499
    d = res["denoiser"]
    assert d["padded_evals_per_s"] > 0 and d["buckets_evals_per_s"] > 0
    s = res["sample"]["samplers"]
    assert set(s) == {"ancestral", "pf_ode_heun", "one_call", "two_call"}
    assert s["ancestral"]["extrapolated"] and s["ancestral"]["steps"] == 1000 and s["ancestral"]["nfe"] == 1001
    assert s["pf_ode_heun"]["extrapolated"] and s["pf_ode_heun"]["nfe"] == 101  # heun: 2 calls/step + decode
    assert not s["one_call"]["extrapolated"] and s["one_call"]["nfe"] == 1
    assert s["two_call"]["nfe"] == 2
    # one network call is cheaper than an extrapolated 1000-step chain of the same network
    assert s["one_call"]["mol_per_s"] > s["ancestral"]["mol_per_s"]


@pytest.mark.slow
def test_train_section(bench, capsys, tmp_path):
    res = _run(bench, capsys, tmp_path, which=("train",), batch_size=8, loop_steps=4)
    t = res["train"]
    assert t["padded_mol_per_s"] > 0 and t["buckets_mol_per_s"] > 0 and t["loop"]["steps"] == 4
    assert abs(sum(t["bucket_fractions"].values()) - 1) < 1e-6
    assert t["step_traces"] == 1 + len(t["bucket_fractions"]) - (29 in t["bucket_fractions"])


def test_main_job_section(bench, capsys, tmp_path):
    """recipes/sample.py twice in fresh processes over one empty compilation cache; the ratios are the ratios."""
    res = _run(bench, capsys, tmp_path, which=("main_job",), main_job_molecules=3, reference_sample_mol_per_s=0.45)
    job = res["main_job"]
    first, second = job["runs"]
    assert (first["run"], second["run"], job["molecules"], job["steps"]) == ("first", "second", 3, 200)
    for run in job["runs"]:
        assert run["wall_s"] > 0 and run["wall_mol_per_s"] == pytest.approx(3 / run["wall_s"])
    assert job["steady_speedup"] == pytest.approx(first["steady_mol_per_s"] / 0.45)
    assert job["wall_speedup_second_run"] == pytest.approx(second["wall_mol_per_s"] / 0.45)
    assert job["second_run_saves_s"] == pytest.approx(first["wall_s"] - second["wall_s"])
