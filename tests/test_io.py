"""Tests of sde_mol.io: XYZ / SDF round trips, folders, and malformed-file errors that name file and line."""

import numpy as np
import pytest
from rdkit import Chem

from sde_mol import io
from sde_mol.data.qm9 import load_qm9
from sde_mol.metrics import bond_orders


@pytest.fixture(scope="module")
def some_qm9():
    """Six test molecules of different sizes (5 to 27 atoms), padded to 29."""
    data = load_qm9("test")
    idx = [0, 1, 500, 4000, 9000, 13000]
    return data.positions[idx], data.atom_types[idx].astype(np.int64)


def real_sizes(types):
    return (types >= 0).sum(axis=1)


def test_xyz_round_trip(tmp_path, some_qm9):
    pos, types = some_qm9
    io.write_xyz(tmp_path / "m.xyz", pos, types)
    p, t = io.read_xyz(tmp_path / "m.xyz", capacity=29)
    np.testing.assert_array_equal(t, types)
    np.testing.assert_allclose(p, pos, atol=1e-7)  # 8 decimals in the file
    p2, t2 = io.read_xyz(tmp_path / "m.xyz")  # padded to the largest molecule
    assert t2.shape == (6, real_sizes(types).max()) and p2.dtype == np.float32
    np.testing.assert_array_equal(t2, types[:, : t2.shape[1]])
    np.testing.assert_array_equal(bond_orders(p, t), bond_orders(pos, types))


def test_xyz_format_is_standard(tmp_path):
    pos = np.array([[[0.0, 0.0, -1.07], [0.0, 0.0, 0.0], [0.0, 0.0, 1.16], [9, 9, 9]]], np.float32)
    io.write_xyz(tmp_path / "hcn.xyz", pos, np.array([[0, 1, 2, -1]]), comments=["hydrogen cyanide"])
    lines = (tmp_path / "hcn.xyz").read_text().splitlines()
    assert lines[:2] == ["3", "hydrogen cyanide"] and len(lines) == 5
    assert lines[2].split() == ["H", "0.00000000", "0.00000000", "-1.07000005"]
    assert [ln.split()[0] for ln in lines[2:]] == ["H", "C", "N"]


def test_sdf_round_trip_and_bonds(tmp_path, some_qm9):
    pos, types = some_qm9
    io.write_sdf(tmp_path / "m.sdf", pos, types)
    p, t = io.read_sdf(tmp_path / "m.sdf", capacity=29)
    np.testing.assert_array_equal(t, types)
    np.testing.assert_allclose(p, pos, atol=5.1e-5)  # V2000 keeps 4 decimals
    orders = bond_orders(pos, types)
    mols = list(Chem.SDMolSupplier(str(tmp_path / "m.sdf"), sanitize=False, removeHs=False))
    assert len(mols) == 6
    for b, mol in enumerate(mols):
        m = mol.GetNumAtoms()
        assert m == real_sizes(types)[b]
        written = np.zeros((m, m), np.int64)
        for bond in mol.GetBonds():
            i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
            written[i, j] = written[j, i] = int(bond.GetBondTypeAsDouble())
        np.testing.assert_array_equal(written, orders[b, :m, :m])


def test_sdf_writes_invalid_molecules(tmp_path):
    pos = np.array([[[0.0, 0, 0], [0.74, 0, 0], [1.48, 0, 0]]], np.float32)  # H with two bonds
    io.write_sdf(tmp_path / "bad.sdf", pos, np.array([[0, 0, 0]]))
    p, t = io.read_sdf(tmp_path / "bad.sdf")
    assert t.tolist() == [[0, 0, 0]] and np.allclose(p, pos, atol=1e-4)


def test_folder_of_mixed_files_sorted_by_name(tmp_path, some_qm9):
    pos, types = some_qm9
    io.write_molecules(tmp_path, pos[:2], types[:2], fmt="sdf", prefix="b")  # b_00000.sdf, b_00001.sdf
    io.write_xyz(tmp_path / "a.xyz", pos[2:5], types[2:5])  # three molecules in one file, read first
    io.write_xyz(tmp_path / "c.xyz", pos[5:], types[5:])
    (tmp_path / "notes.txt").write_text("ignored")
    p, t = io.read_molecules(tmp_path, capacity=29)
    order = [2, 3, 4, 0, 1, 5]
    np.testing.assert_array_equal(t, types[order])
    np.testing.assert_allclose(p, pos[order], atol=5.1e-5)
    p1, t1 = io.read_molecules(tmp_path / "a.xyz")
    assert t1.shape == (3, real_sizes(types[2:5]).max())


def test_write_molecules_one_file_each(tmp_path, some_qm9):
    pos, types = some_qm9
    paths = io.write_molecules(tmp_path / "s", pos, types)
    assert [p.name for p in paths] == [f"mol_{i:05d}.xyz" for i in range(6)]
    p, t = io.read_molecules(tmp_path / "s", capacity=29)
    np.testing.assert_array_equal(t, types)


# ---------------------------------------------------------------------------------------------------------
# Malformed files

GOOD = "3\nhcn\nH 0.0 0.0 -1.07\nC 0.0 0.0 0.0\nN 0.0 0.0 1.16\n"


@pytest.mark.parametrize(
    "text,line,expected",
    [
        (GOOD.replace("3\n", "4\n", 1), 6, "expected 4 atom lines"),  # count too large: file ends
        (GOOD.replace("3\n", "2\n", 1), 5, "expected an atom count line"),  # count too small: N line read as count
        (GOOD + "x\n", 6, "expected an atom count line"),
        (GOOD.replace("C 0.0 0.0 0.0", "C 0.0 abc 0.0"), 4, "finite number for coordinate y, got 'abc'"),
        (GOOD.replace("C 0.0 0.0 0.0", "C 0.0 0.0 nan"), 4, "finite number for coordinate z"),
        (GOOD.replace("C 0.0 0.0 0.0", "C 0.0 0.0"), 4, "expected 4 fields 'element x y z', got 3"),
        (GOOD.replace("N 0.0", "Cl 0.0"), 5, "unknown element 'Cl'"),
        (GOOD + GOOD.replace("H 0.0", "Xx 0.0"), 8, "unknown element 'Xx'"),
        (GOOD.replace("H 0.0", "h 0.0"), 3, "unknown element 'h'"),  # never guessed
        ("", 1, "empty file"),
        ("\n\n", 1, "empty file"),
        ("0\n\n", 1, "one positive integer"),
    ],
)
def test_malformed_xyz(tmp_path, text, line, expected):
    path = tmp_path / "samples.xyz"
    path.write_text(text)
    with pytest.raises(io.MoleculeFileError) as err:
        io.read_molecules(path)
    assert f"samples.xyz:{line}: " in str(err.value) and expected in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)


def hcn_sdf(tmp_path) -> str:
    pos = np.array([[[0.0, 0.0, -1.07], [0.0, 0.0, 0.0], [0.0, 0.0, 1.16]]], np.float32)
    io.write_sdf(tmp_path / "hcn.sdf", np.concatenate([pos, pos]), np.array([[0, 1, 2], [0, 1, 2]]))
    return (tmp_path / "hcn.sdf").read_text()


@pytest.mark.parametrize("element,record,line", [("Cl", 0, 6), ("Xx", 1, 11 + 6)])
def test_sdf_unknown_element_names_its_line(tmp_path, element, record, line):
    lines = hcn_sdf(tmp_path).splitlines()
    # records are 11 lines (3 header, counts, 3 atoms, 2 bonds, M  END, $$$$); atom 2 (C) is the 6th line
    assert lines[line - 1][31:34].strip() == "C"
    lines[line - 1] = lines[line - 1][:31] + f"{element:<3s}" + lines[line - 1][34:]
    (tmp_path / "bad.sdf").write_text("\n".join(lines) + "\n")
    with pytest.raises(io.MoleculeFileError, match=rf"bad\.sdf:{line}: unknown element '{element}'"):
        io.read_sdf(tmp_path / "bad.sdf")


def test_sdf_malformed_record_and_empty(tmp_path):
    lines = hcn_sdf(tmp_path).splitlines()
    bad = lines[:15] + ["garbage"] + lines[16:]  # second record: first atom line broken
    (tmp_path / "bad.sdf").write_text("\n".join(bad) + "\n")
    with pytest.raises(io.MoleculeFileError, match=r"bad\.sdf:16: expected a V2000 atom line"):
        io.read_sdf(tmp_path / "bad.sdf")
    bad = lines[:19] + ["  2  9  3  0"] + lines[20:]  # second record: bond to a missing atom 9
    (tmp_path / "bad.sdf").write_text("\n".join(bad) + "\n")
    with pytest.raises(io.MoleculeFileError, match=r"bad\.sdf:12: expected a mol block"):
        io.read_sdf(tmp_path / "bad.sdf")
    (tmp_path / "empty.sdf").write_text("")
    with pytest.raises(io.MoleculeFileError, match=r"empty\.sdf:1: .*empty file"):
        io.read_molecules(tmp_path / "empty.sdf")


def test_capacity_and_path_errors(tmp_path):
    (tmp_path / "a.xyz").write_text(GOOD + GOOD)
    with pytest.raises(io.MoleculeFileError, match=r"a\.xyz:1: molecule has 3 atoms, more than the capacity 2"):
        io.read_xyz(tmp_path / "a.xyz", capacity=2)
    (tmp_path / "a.pdb").write_text("")
    with pytest.raises(io.MoleculeFileError, match="expected a .xyz or .sdf file"):
        io.read_molecules(tmp_path / "a.pdb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.MoleculeFileError, match="found none"):
        io.read_molecules(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        io.read_molecules(tmp_path / "missing.xyz")
