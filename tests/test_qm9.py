"""QM9 from the qm9pack wheel: counts, EDM split, cache behaviour, DatasetInfo."""

import os
import time

import numpy as np
import pytest

from sde_mol.data import qm9
from sde_mol.data.loader import BatchIterator, encode_split


@pytest.fixture(scope="module")
def arrays():
    return qm9.load_qm9_arrays()


def test_split_sanity_values():
    perm = np.random.RandomState(0).permutation(qm9.N_QM9)
    assert perm[:8].tolist() == [130195, 68784, 7957, 25911, 20168, 12658, 53330, 76489]
    assert perm[100000:100005].tolist() == [68751, 123554, 28669, 72737, 11612]
    assert perm[117748:117753].tolist() == [115839, 90242, 66405, 71231, 103168]
    assert perm[-3:].tolist() == [42613, 43567, 68268]
    s = qm9.edm_split_positions()
    assert [len(s[k]) for k in ("train", "valid", "test")] == [100000, 17748, 13083]
    allpos = np.concatenate([s["train"], s["valid"], s["test"]])
    assert np.array_equal(np.sort(allpos), np.arange(qm9.N_QM9))
    assert all(np.all(np.diff(s[k]) > 0) for k in s)


def test_molecule_count_and_excluded(arrays):
    gdb = arrays["gdb_index"]
    assert len(gdb) == 130831
    assert np.all(np.diff(gdb) > 0)
    # 133,885 - 130,831 = 3,054 uncharacterised molecules absent
    assert gdb.min() >= 1 and gdb.max() <= 133885
    assert 133885 - len(gdb) == 3054


def test_train_histogram_equals_edm(arrays):
    train = qm9.load_qm9("train")
    counts = qm9.size_counts_from(train.n_atoms)
    expected = [qm9.EDM_TRAIN_SIZE_COUNTS.get(m, 0) for m in range(30)]
    assert list(counts) == expected
    assert qm9.qm9_info(train) == qm9.qm9_info()
    # atom-type counts of the train split (facts §1.4)
    types = train.atom_types[train.atom_types >= 0]
    assert np.bincount(types).tolist() == [923537, 635559, 101476, 140202, 2323]


def test_split_contents():
    test = qm9.load_qm9("test")
    assert len(test) == 13083
    assert np.all(np.diff(test.gdb_index) > 0)
    # padding consistent with n_atoms, positions zero on padding
    assert np.array_equal(test.mask.sum(1), test.n_atoms)
    assert np.all(test.positions[~test.mask] == 0)
    # gdb 1 is methane: C + 4 H
    all_ = qm9.load_qm9("all")
    assert all_.gdb_index[0] == 1 and all_.n_atoms[0] == 5
    assert all_.atom_types[0, :5].tolist() == [1, 0, 0, 0, 0]
    np.testing.assert_allclose(all_.positions[0, 1], [0.002150416, -0.0060313176, 0.0019761204], atol=1e-7)
    assert all_.charges[0, :6].tolist() == [6, 1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="unknown split"):
        qm9.load_qm9("training")


def test_dataset_info():
    info = qm9.qm9_info()
    assert info.max_n_atoms == 29 and info.n_feat == 6 and info.atom_decoder == ("H", "C", "N", "O", "F")
    p = info.size_probs()
    np.testing.assert_allclose(p.sum(), 1.0)
    np.testing.assert_allclose((p * np.arange(30)).sum(), 18.031, atol=1e-3)
    ent = -(p[p > 0] * np.log(p[p > 0])).sum()
    np.testing.assert_allclose(ent, 2.4757, atol=1e-4)
    np.testing.assert_allclose(info.size_log_prob(19), np.log(np.float32(0.13832)), rtol=1e-6)
    assert info.size_log_prob(28) < -60  # absent size: log(1e-30)
    hash(info)  # usable as a static argument


def test_cache_second_load_fast_and_rebuild_on_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("SDE_MOL_CACHE", str(tmp_path))
    a = qm9.load_qm9_arrays()  # builds the cache in tmp_path
    path = tmp_path / f"qm9pack_v{qm9.CACHE_FORMAT}.npz"
    assert path.is_file()
    t0 = time.perf_counter()
    b = qm9.load_qm9_arrays()
    assert time.perf_counter() - t0 < 2.0
    assert np.array_equal(a["positions"], b["positions"])
    # corrupt: flip bytes in the middle of the file -> detected and rebuilt, never used
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    c = qm9.load_qm9_arrays()
    assert np.array_equal(a["positions"], c["positions"])
    assert np.array_equal(a["smiles"], c["smiles"])
    # truncated
    path.write_bytes(path.read_bytes()[:1000])
    d = qm9.load_qm9_arrays()
    assert np.array_equal(a["atom_types"], d["atom_types"])
    # stale: a cache with a different fingerprint is ignored
    assert qm9._read_cache(path, "other-fingerprint") is None
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_parse_errors_name_file_and_field(tmp_path):
    header = "XYZ_file,Index,SMILES,N_atoms,Elements,XYZ_Ang\n"
    good = '"a.xyz",1,"C",2,"[\'C\',\'H\']","[[0.,1.0,2.1997E-6],[1,2,3]]"\n'
    bad = '"b.xyz",2,"C",2,"[\'C\',\'Cl\']","[[0.,1.0,2.0],[1,2,3]]"\n'
    for i, name in enumerate(qm9.CSV_FILES):
        (tmp_path / name).write_text(header + (good if i == 0 else ""))
    arrays = qm9.parse_qm9pack(tmp_path)
    np.testing.assert_allclose(arrays["positions"][0, 0], [0.0, 1.0, 2.1997e-6])
    (tmp_path / qm9.CSV_FILES[1]).write_text(header + bad)
    with pytest.raises(qm9.QM9FormatError, match=r"qm9_part2.csv:2.*Elements.*Cl"):
        qm9.parse_qm9pack(tmp_path)
    (tmp_path / qm9.CSV_FILES[1]).write_text(header + good.replace("[1,2,3]", "[1,2]"))
    with pytest.raises(qm9.QM9FormatError, match=r"qm9_part2.csv:2.*expected 2 elements and 6 coordinates"):
        qm9.parse_qm9pack(tmp_path)
    (tmp_path / qm9.CSV_FILES[1]).write_text(header + good.replace("2.1997E-6", "abc"))
    with pytest.raises(qm9.QM9FormatError, match=r"qm9_part2.csv:2: field XYZ_Ang"):
        qm9.parse_qm9pack(tmp_path)


def test_encode_and_batch_iterator():
    split = qm9.load_qm9("valid").subset(slice(0, 1000))
    info = qm9.qm9_info()
    pos, feat, mask = encode_split(split, info)
    np.testing.assert_allclose((pos * mask[..., None]).sum(1), 0.0, atol=1e-4)
    real = feat[mask]
    assert set(np.unique(real[:, :5])) == {0.0, 0.25}
    np.testing.assert_allclose(real[:, :5].sum(1), 0.25)
    z = np.round(real[:, 5] * 10).astype(int)
    assert set(z) <= {1, 6, 7, 8, 9}
    assert np.all(feat[~mask] == 0)

    it = BatchIterator(split, info, 64, seed=3, shuffle=True, drop_last=False)
    batches = list(it.epoch(0))
    assert len(batches) == len(it) == 16
    assert all(b.positions.shape == (64, 29, 3) and b.features.shape == (64, 29, 6) for b in batches)
    assert sum(b.weight.sum() for b in batches) == 1000  # fill-ins carry weight 0
    # same seed and epoch -> same order; another epoch -> another order
    again = next(BatchIterator(split, info, 64, seed=3).epoch(0))
    np.testing.assert_array_equal(again.positions, batches[0].positions)
    other = next(it.epoch(1))
    assert not np.array_equal(other.positions, batches[0].positions)
    assert len(BatchIterator(split, info, 64, drop_last=True)) == 15


def test_bucketed_batches_cover_each_molecule_once():
    split = qm9.load_qm9("valid").subset(slice(0, 3000))
    info = qm9.qm9_info()
    it = BatchIterator(split, info, 32, seed=1, buckets=(17, 20, 23, 29), drop_last=False)
    seen = []
    caps = set()
    for b in it.epoch(0):
        cap = b.positions.shape[1]
        caps.add(cap)
        assert b.features.shape == (32, cap, 6) and b.mask.shape == (32, cap)
        real = b.weight > 0
        # every molecule fits its bucket and is in the smallest bucket that holds it
        assert np.all(b.n_atoms <= cap)
        lower = max([c for c in it.buckets if c < cap], default=0)
        assert np.all(b.n_atoms[real] > lower)
        assert np.array_equal(b.mask.sum(1), b.n_atoms)
        seen.extend(zip(b.n_atoms[real].tolist(), b.positions[real].sum((1, 2)).round(4).tolist(), strict=True))
    assert len(seen) == 3000 and caps == {17, 20, 23, 29}
    assert len(it) == len(list(it.epoch(3)))
    # the full-capacity iterator and the bucketed one contain the same molecules
    ref = BatchIterator(split, info, 32, seed=1, drop_last=False)
    ref_seen = []
    for b in ref.epoch(0):
        real = b.weight > 0
        ref_seen.extend(zip(b.n_atoms[real].tolist(), b.positions[real].sum((1, 2)).round(4).tolist(), strict=True))
    assert sorted(seen) == sorted(ref_seen)
    with pytest.raises(ValueError, match="largest molecule"):
        BatchIterator(split, info, 32, buckets=(17, 20))
