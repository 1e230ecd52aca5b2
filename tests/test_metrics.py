"""Tests of sde_mol.metrics: EDM parity fixture, hand-built threshold cases, calibration on real QM9."""

import time

import numpy as np
import pytest
from rdkit import Chem

from sde_mol import metrics
from sde_mol.data.qm9 import load_qm9


def ty(elements: str) -> np.ndarray:
    """Atom types from a string of one-letter QM9 elements, e.g. ty("HCN")."""
    return np.array(["HCNOF".index(e) for e in elements])


def canon(smiles: str) -> str:
    """Re-canonicalise with this RDKit, keeping explicit [H] atoms ('' stays '')."""
    if not smiles:
        return ""
    params = Chem.SmilesParserParams()
    params.removeHs = False
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles, params))


def fixture_types(one_hot: np.ndarray) -> np.ndarray:
    return np.where(one_hot.sum(-1) > 0, one_hot.argmax(-1), -1)


def pair(types, d_pm, direction=(1.0, 2.0, 2.0)):
    """Two atoms `d_pm` apart along a generic direction, in one batch of one molecule."""
    u = np.asarray(direction) / np.linalg.norm(direction)
    x = np.stack([np.zeros(3), u * d_pm / 100.0]).astype(np.float32)
    return x[None], np.asarray(types)[None]


# ---------------------------------------------------------------------------------------------------------
# Parity with the PyTorch EDM reference


@pytest.mark.parametrize("prefix,x_key,h_key", [("met_in", "x", "one_hot"), ("met_dec", "dec_x", "dec_one_hot")])
def test_fixture_parity(fixture_npz, prefix, x_key, h_key):
    d = fixture_npz
    x, types = d[x_key], fixture_types(d[h_key])
    np.testing.assert_array_equal(types, d[f"{prefix}_atom_type"])
    s = metrics.stability(x, types)
    for key in ("bond_order", "valence", "atom_stable", "mol_stable", "n_stable_atoms"):
        np.testing.assert_array_equal(s[key].astype(np.int64), d[f"{prefix}_{key}"], err_msg=key)
    assert s["atom_stability"] == pytest.approx(float(d[f"{prefix}_atm_stable_frac"]), abs=1e-12)
    assert s["molecule_stability"] == pytest.approx(float(d[f"{prefix}_mol_stable_frac"]), abs=1e-12)

    valid, smiles = metrics.rdkit_validity(x, types)
    np.testing.assert_array_equal(valid.astype(np.int64), d[f"{prefix}_rdkit_valid"])
    assert [canon(s) for s in smiles] == [canon(s) for s in d[f"{prefix}_smiles"].tolist()]

    reference = {canon(s) for s in d["met_novelty_reference_smiles"].tolist()}
    out = metrics.evaluate(x, types, reference)
    assert out["n_molecules"] == 3
    for key, ref_key in [("validity", "validity"), ("uniqueness", "uniqueness"), ("novelty", "novelty")]:
        assert out[key] == pytest.approx(float(d[f"{prefix}_{ref_key}"]), abs=1e-12), key
    assert out["valid_and_unique"] == pytest.approx(out["validity"] * out["uniqueness"], abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Hand-built molecules


@pytest.mark.parametrize(
    "types,threshold_pm,order_below,order_above",
    [
        (ty("CH"), 119.0, 1, 0),  # C-H single: 109 + 10
        (ty("HH"), 84.0, 1, 0),
        (ty("CC"), 164.0, 1, 0),
        (ty("CC"), 139.0, 2, 1),  # C=C: 134 + 5
        (ty("CC"), 123.0, 3, 2),  # C#C: 120 + 3
        (ty("NC"), 119.0, 3, 2),  # C#N: 116 + 3 (pair given in the other order)
        (ty("ON"), 126.0, 2, 1),  # N=O: 121 + 5; no triple entry
        (ty("FO"), 152.0, 1, 0),  # O-F: no double entry
    ],
)
def test_threshold_plus_minus_0p1_pm(types, threshold_pm, order_below, order_above):
    for d, expected in [(threshold_pm - 0.1, order_below), (threshold_pm + 0.1, order_above)]:
        x, t = pair(types, d)
        o = metrics.bond_orders(x, t)
        assert o[0, 0, 1] == o[0, 1, 0] == expected, (types, d)
        assert o[0, 0, 0] == o[0, 1, 1] == 0


@pytest.mark.parametrize("types,d_angstrom,expected", [(ty("CO"), 1.25, 1), (ty("NO"), 1.5, 0)])
def test_comparisons_are_strict(types, d_angstrom, expected):
    # 1.25 and 1.5 are exact in binary, so 100 * d equals the threshold (C=O 120 + 5, N-O 140 + 10) exactly
    x = np.zeros((1, 2, 3), np.float32)
    x[0, 1, 0] = d_angstrom
    assert metrics.bond_orders(x, np.array([types]))[0, 0, 1] == expected


def hcn():
    x = np.array([[0.0, 0.0, -1.07], [0.0, 0.0, 0.0], [0.0, 0.0, 1.16]], np.float32)
    return x, ty("HCN")


def test_hydrogen_cyanide_triple_bond():
    x, t = hcn()
    s = metrics.stability(x[None], t[None])
    np.testing.assert_array_equal(s["bond_order"][0], [[0, 1, 0], [1, 0, 3], [0, 3, 0]])
    np.testing.assert_array_equal(s["valence"][0], [1, 4, 3])
    assert s["mol_stable"].tolist() == [True] and s["atom_stability"] == 1.0
    valid, smiles = metrics.rdkit_validity(x[None], t[None])
    assert valid.tolist() == [True] and canon(smiles[0]) == canon("[H]C#N")
    mol = metrics.to_rdkit(x, t, s["bond_order"][0])
    assert [a.GetSymbol() for a in mol.GetAtoms()] == ["H", "C", "N"]
    assert mol.GetBondBetweenAtoms(1, 2).GetBondType() == Chem.BondType.TRIPLE
    np.testing.assert_allclose(mol.GetConformer().GetPositions(), x, atol=1e-6)


def test_asymmetric_padding_is_ignored():
    """Padding in the middle and at the front, with junk coordinates right on top of real atoms."""
    x, t = hcn()
    water = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], np.float32)
    pos = np.full((2, 6, 3), 0.5, np.float32)  # padding sits 0.5-0.9 A from real atoms: would bond
    types = np.full((2, 6), -1)
    pos[0, [1, 3, 4]], types[0, [1, 3, 4]] = x, t
    pos[1, [0, 2, 5]], types[1, [0, 2, 5]] = water, ty("OHH")
    s = metrics.stability(pos, types)
    assert s["mol_stable"].tolist() == [True, True]
    assert s["atom_stability"] == 1.0  # pooled over 6 real atoms, padding not counted
    np.testing.assert_array_equal(s["bond_order"][0][np.ix_([1, 3, 4], [1, 3, 4])], [[0, 1, 0], [1, 0, 3], [0, 3, 0]])
    pad = types < 0
    assert not s["bond_order"][pad].any() and not s["bond_order"].transpose(0, 2, 1)[pad].any()
    assert not s["atom_stable"][pad].any()
    valid, smiles = metrics.rdkit_validity(pos, types)
    assert valid.all() and [canon(s) for s in smiles] == [canon("[H]C#N"), canon("[H]O[H]")]


def test_unstable_and_invalid_molecules():
    # H-H-H in a line, 0.74 A apart: the middle H has valence 2 (unstable) and RDKit rejects it
    x = np.array([[[0.0, 0, 0], [0.74, 0, 0], [1.48, 0, 0]]], np.float32)
    t = ty("HHH")[None]
    s = metrics.stability(x, t)
    assert s["atom_stable"][0].tolist() == [True, False, True] and s["mol_stable"].tolist() == [False]
    assert s["atom_stability"] == pytest.approx(2 / 3)
    valid, smiles = metrics.rdkit_validity(x, t)
    assert valid.tolist() == [False] and smiles == [""]
    # lone carbon: unstable (valence 0) but RDKit-valid (implicit hydrogens), SMILES 'C'
    out = metrics.evaluate(np.zeros((1, 1, 3), np.float32), ty("C")[None])
    assert out["molecule_stability"] == 0.0 and out["validity"] == 1.0


def test_largest_fragment_uniqueness_novelty():
    x_hcn, t_hcn = hcn()
    water = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], np.float32)
    methane = np.array([[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63],
                        [0.63, -0.63, -0.63]], np.float32)  # fmt: skip
    pos = np.zeros((4, 8, 3), np.float32)
    types = np.full((4, 8), -1)
    pos[0, :3], types[0, :3] = x_hcn, t_hcn
    pos[1, :3], types[1, :3] = x_hcn + 5.0, t_hcn  # same molecule, translated
    pos[2, :3], types[2, :3] = water + 10.0, ty("OHH")  # water far from methane: two fragments
    pos[2, 3:8], types[2, 3:8] = methane, ty("CHHHH")
    pos[3, :3], types[3, :3] = [[0, 0, 0], [0.74, 0, 0], [1.48, 0, 0]], ty("HHH")  # H with 2 bonds: invalid
    valid, smiles = metrics.rdkit_validity(pos, types)
    assert valid.tolist() == [True, True, True, False]
    assert canon(smiles[2]) == canon("[H]C([H])([H])[H]")  # largest fragment (5 atoms) beats water (3)
    out = metrics.evaluate(pos, types, {smiles[0]})
    assert out["validity"] == 0.75
    assert out["uniqueness"] == pytest.approx(2 / 3)
    assert out["valid_and_unique"] == 0.5
    assert out["novelty"] == 0.5  # of {HCN, methane} only methane is novel
    assert metrics.evaluate(pos, types)["novelty"] is None
    # connected validity: valid AND one fragment (water + methane is valid for EDM, not connected)
    table = metrics.molecule_table(pos, types)
    assert table["connected"].tolist() == [True, True, False, False]
    assert table["n_atoms"].tolist() == [3, 3, 8, 3] and table["molecule_stable"].tolist() == [True, True, True, False]
    np.testing.assert_allclose(table["atom_stable_fraction"], [1, 1, 1, 2 / 3])
    assert out["connected_validity"] == 0.5


def test_unsupported_elements_raise():
    x, t = pair((0, 1), 150.0)
    with pytest.raises(ValueError, match="'Cl'"):
        metrics.bond_orders(x, t, atom_decoder=("C", "Cl"))
    with pytest.raises(ValueError, match=r"\[-1, 4\]"):
        metrics.bond_orders(x, np.array([[0, 7]]))


def test_evaluate_types_and_ranges():
    x, t = hcn()
    out = metrics.evaluate(x[None], t[None], set())
    assert set(out) == {"n_molecules", "atom_stability", "molecule_stability", "validity", "uniqueness",
                        "valid_and_unique", "novelty", "connected_validity"}  # fmt: skip
    assert type(out["n_molecules"]) is int
    for k, v in out.items():
        if k != "n_molecules":
            assert type(v) is float and 0.0 <= v <= 1.0, k


# ---------------------------------------------------------------------------------------------------------
# Training SMILES cache


def test_train_smiles_cache(tmp_path, monkeypatch):
    small = load_qm9("train").subset(np.arange(300))
    monkeypatch.setattr(metrics, "load_qm9", lambda split: small)
    monkeypatch.setattr(metrics, "cache_dir", lambda: tmp_path)
    built = metrics.train_smiles("train", processes=1)
    expected = {s for s in metrics.whole_molecule_smiles(small.positions, small.atom_types) if s is not None}
    assert built == expected and 250 < len(built) <= 300
    path = tmp_path / "qm9_train_smiles.txt"
    header = path.read_text().splitlines()[0]
    assert "rdkit=" in header and "source=" in header and "pipeline=" in header
    # a second call reads the file (no rebuild)
    monkeypatch.setattr(metrics, "whole_molecule_smiles", lambda *a, **k: pytest.fail("rebuilt a valid cache"))
    assert metrics.train_smiles("train") == built
    # a stale header (other RDKit release) triggers a rebuild, and no temporary file is left behind
    monkeypatch.undo()
    monkeypatch.setattr(metrics, "load_qm9", lambda split: small)
    monkeypatch.setattr(metrics, "cache_dir", lambda: tmp_path)
    path.write_text(path.read_text().replace("rdkit=", "rdkit=0.", 1))
    assert metrics.train_smiles("train", processes=1) == built
    assert path.read_text().splitlines()[0] == header
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_whole_molecule_smiles_keeps_fragments_and_marks_failures():
    x_hcn, t_hcn = hcn()
    pos = np.zeros((2, 6, 3), np.float32)
    types = np.full((2, 6), -1)
    pos[0, :3], types[0, :3] = x_hcn, t_hcn
    pos[0, 3:6], types[0, 3:6] = x_hcn + 10.0, t_hcn
    pos[1, :3], types[1, :3] = [[0, 0, 0], [0.74, 0, 0], [1.48, 0, 0]], ty("HHH")
    smiles = metrics.whole_molecule_smiles(pos, types)
    assert canon(smiles[0]) == canon("[H]C#N.[H]C#N") and smiles[1] is None


# ---------------------------------------------------------------------------------------------------------
# Calibration on real QM9 molecules (EDM Table 2, "Data": atom 99.0, mol 95.2, valid 97.7, V&U 97.7)


@pytest.fixture(scope="module")
def qm9_test():
    return load_qm9("test")


def test_calibration_on_qm9_test_subset(qm9_test):
    """Every 6th molecule of the test split (2181; the split is gdb-ordered and stability varies strongly
    along it, so a stride sample, not a prefix). Measured (RDKit 2026.09): atom 0.99345 (39113 / 39371
    atoms), molecule 0.95323 (2079 / 2181), validity 0.97937 (2136), uniqueness 1.0. Binomial noise of the
    subset is ~0.0045 on molecule stability; off-by-one-pm margins move it by 0.0023-0.005, a missing
    triple table or margin by >= 0.1. Stability is pure float32 numpy, hence the exact counts; validity depends
    on the RDKit release, hence a band."""
    sub = qm9_test.subset(np.arange(0, len(qm9_test), 6))
    s = metrics.stability(sub.positions, sub.atom_types)
    assert (int(s["n_stable_atoms"].sum()), int(s["mol_stable"].sum())) == (39113, 2079)
    out = metrics.evaluate(sub.positions, sub.atom_types)
    assert out["n_molecules"] == 2181
    assert 0.985 <= out["atom_stability"] <= 0.997
    assert 0.947 <= out["molecule_stability"] <= 0.958
    assert 0.972 <= out["validity"] <= 0.984
    assert out["uniqueness"] == 1.0


def test_ten_thousand_molecules_in_under_a_minute(qm9_test):
    sub = qm9_test.subset(np.arange(10_000))
    t0 = time.perf_counter()
    metrics.evaluate(sub.positions, sub.atom_types, set())
    assert time.perf_counter() - t0 < 60.0


@pytest.mark.slow
def test_full_test_split_reproduces_edm_data_row(qm9_test):
    """Measured: atom 0.99344, molecule 0.95215, validity 0.97738, valid & unique 0.97738."""
    out = metrics.evaluate(qm9_test.positions, qm9_test.atom_types)
    assert 0.949 <= out["molecule_stability"] <= 0.955
    assert 0.974 <= out["validity"] <= 0.980
    assert 0.974 <= out["valid_and_unique"] <= 0.980
    assert 0.988 <= out["atom_stability"] <= 0.995


@pytest.mark.slow
def test_train_smiles_real_split():
    """The full train-split build (or its cache): every test molecule's whole SMILES of a train molecule is in it."""
    ref = metrics.train_smiles("train")
    train = load_qm9("train").subset(np.arange(0, 100_000, 1000))
    some = [s for s in metrics.whole_molecule_smiles(train.positions, train.atom_types) if s is not None]
    assert 95_000 < len(ref) <= 100_000 and set(some) <= ref


def test_matches_is_two_standard_errors_below_the_teacher():
    teacher = {"atom_stability": 0.8, "molecule_stability": 0.05, "validity": 0.5}
    n = 500
    se = {k: np.sqrt(2 * p * (1 - p) / n) for k, p in teacher.items()}
    assert metrics.matches(dict(teacher), teacher, n=n)
    assert metrics.matches({k: teacher[k] + 0.1 for k in teacher}, teacher, n=n)  # better is a match
    for k in teacher:  # just inside and just outside two standard errors, one metric at a time
        inside = dict(teacher, **{k: teacher[k] - 1.9 * se[k]})
        outside = dict(teacher, **{k: teacher[k] - 2.1 * se[k]})
        assert metrics.matches(inside, teacher, n=n) and not metrics.matches(outside, teacher, n=n)
    assert not metrics.matches(dict(teacher, validity=float("nan")), teacher, n=n)
    assert not metrics.matches({"atom_stability": 0.9}, teacher, n=n)  # a missing metric is not a match
    with pytest.raises(ValueError, match="n = 0"):
        metrics.matches(teacher, teacher, n=0)
