"""experiments/ct_fixed_point_1d.py, run as a script: the exact population fixed points of consistency training
on three weighted points on a line. They back the diagnosis of the one-step CT gap (test_consistency.py,
ONE_STEP_GAP; experiments/NOTES.md): with the teacher's exact step (CD) the one-step map lands on the points in the
data's proportions; CT with an absolute distance (iCT's pseudo-Huber where the targets split) lands on points in
the wrong proportions at every N; CT with the squared distance blurs, less as N grows."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

SCRIPT = ROOT / "experiments" / "ct_fixed_point_1d.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def rows():
    proc = _run("--n-points", "161", "641", "--grid", "8001")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    return {(r["target"], r["n_points"]): r for r in out}


def test_cd_keeps_the_data_proportions(rows):
    for n in (161, 641):
        r = rows["cd", n]
        assert r["within_tol"] > 0.93
        np.testing.assert_allclose(r["mass_per_point"], [0.25, 0.25, 0.5], atol=0.03)


def test_l1_ct_is_sharp_with_the_wrong_proportions_at_every_n(rows):
    errors = []
    for n in (161, 641):
        r = rows["l1", n]
        assert r["within_tol"] > 0.95
        errors.append(abs(r["mass_per_point"][0] - 0.25))
        assert errors[-1] > 0.07 and r["mass_per_point"][1] > 0.3
    assert errors[1] > 0.8 * errors[0]  # a finer grid does not remove it


def test_l2_ct_blurs_less_as_n_grows(rows):
    coarse, fine = rows["l2", 161]["within_tol"], rows["l2", 641]["within_tol"]
    assert coarse < 0.7 and fine > coarse + 0.1 and fine < 0.9


def test_bad_config_is_a_clear_error():
    for args, message in (
        (("--points", "0", "1", "--weights", "1"), "one positive weight per point"),
        (("--n-points", "1"), "must be >= 2"),
    ):
        proc = _run(*args)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
