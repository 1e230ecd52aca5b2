"""QM9 from the installed `qm9pack` wheel, with EDM's exact train/valid/test split.

The wheel holds the 130,831 molecules that EDM keeps (the 3,054 "uncharacterised" ones are absent) as CSV
files. They are parsed once into padded numpy arrays and cached as an uncompressed npz in a user cache
directory (`$SDE_MOL_CACHE`, else `$XDG_CACHE_HOME/sde_mol`, else `~/.cache/sde_mol`). The cache records a
fingerprint of the source files and a checksum of its own arrays; a stale or corrupt cache is rebuilt, never used.

Split (EDM, `qm9/data/prepare/qm9.py`): molecules sorted by gdb index; permutation
`np.random.RandomState(0).permutation(130831)`; positions [0, 100000) train, [100000, 117748) valid,
[117748, 130831) test; each split is stored in ascending gdb order (EDM reads the archive in order).
"""

import csv
import hashlib
import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

ATOM_DECODER = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS = (1, 6, 7, 8, 9)
MAX_N_ATOMS = 29
QM9_BUCKETS = (17, 20, 23, 29)
"""Size buckets (padded widths) for QM9 batches: each holds about a quarter of the training molecules."""
N_QM9 = 130_831
N_TRAIN, N_VALID, N_TEST = 100_000, 17_748, 13_083
CACHE_FORMAT = 1
CSV_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")

# EDM's hard-coded train-split size histogram (configs/datasets_config.py, key n_nodes): M -> count.
EDM_TRAIN_SIZE_COUNTS = {
    3: 1,
    4: 4,
    5: 5,
    6: 9,
    7: 16,
    8: 49,
    9: 124,
    10: 362,
    11: 807,
    12: 1689,
    13: 3060,
    14: 5136,
    15: 7796,
    16: 10644,
    17: 13025,
    18: 13364,
    19: 13832,
    20: 9482,
    21: 9970,
    22: 3393,
    23: 4848,
    24: 539,
    25: 1506,
    26: 48,
    27: 266,
    29: 25,
}

Split = Literal["train", "valid", "test", "all"]


class QM9FormatError(ValueError):
    """A QM9 source row or cache file does not have the expected content."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its dataset (hashable, so usable as a static jit argument)."""

    name: str = "qm9"
    atom_decoder: tuple[str, ...] = ATOM_DECODER
    atomic_numbers: tuple[int, ...] = ATOMIC_NUMBERS
    max_n_atoms: int = MAX_N_ATOMS
    # size_counts[M] = number of train molecules with M atoms, M = 0..max_n_atoms
    size_counts: tuple[int, ...] = field(default=())
    # EDM normalisation [x, one-hot, charge] (norm_values) and biases
    norm_values: tuple[float, float, float] = (1.0, 4.0, 10.0)
    norm_biases: tuple[float, float, float] = (0.0, 0.0, 0.0)
    include_charges: bool = True

    @property
    def n_types(self) -> int:
        return len(self.atom_decoder)

    @property
    def n_feat(self) -> int:
        """Feature channels of the diffusion state: one-hot types (+ charge)."""
        return self.n_types + int(self.include_charges)

    def size_probs(self) -> np.ndarray:
        counts = np.asarray(self.size_counts, dtype=np.float64)
        if counts.size == 0 or counts.sum() <= 0:
            raise ValueError("DatasetInfo.size_counts is empty: build it with qm9_info() or from a split")
        return counts / counts.sum()

    def size_log_prob(self, n_atoms) -> np.ndarray:
        """EDM's log p(M) = log(count / total + 1e-30), in float32 like the reference."""
        p = self.size_probs().astype(np.float32)
        return np.asarray(np.log(p[np.asarray(n_atoms)] + np.float32(1e-30)))


def size_counts_from(n_atoms: np.ndarray, max_n_atoms: int = MAX_N_ATOMS) -> tuple[int, ...]:
    return tuple(int(c) for c in np.bincount(np.asarray(n_atoms), minlength=max_n_atoms + 1))


@dataclass(frozen=True, eq=False)
class QM9Split:
    """A split of QM9 as padded host arrays (raw units: Angstrom, atomic numbers)."""

    name: str
    gdb_index: np.ndarray  # (n,) int32, 1-based QM9 index
    n_atoms: np.ndarray  # (n,) int32
    atom_types: np.ndarray  # (n, 29) int8, index into ATOM_DECODER, -1 on padding
    positions: np.ndarray  # (n, 29, 3) float32, raw coordinates (not centred), zero on padding
    smiles: np.ndarray  # (n,) str, the QM9 (GDB) SMILES of the wheel

    def __len__(self) -> int:
        return int(self.gdb_index.shape[0])

    @property
    def mask(self) -> np.ndarray:
        return self.atom_types >= 0

    @property
    def charges(self) -> np.ndarray:
        """Atomic numbers, 0 on padding."""
        z = np.asarray((0,) + ATOMIC_NUMBERS, dtype=np.int32)
        return z[self.atom_types.astype(np.int32) + 1]

    @property
    def one_hot(self) -> np.ndarray:
        return (self.atom_types[..., None] == np.arange(len(ATOM_DECODER))).astype(np.float32)

    def centred_positions(self) -> np.ndarray:
        m = self.mask[..., None].astype(np.float64)
        mean = (self.positions * m).sum(axis=1, keepdims=True) / m.sum(axis=1, keepdims=True)
        return ((self.positions - mean) * m).astype(np.float32)

    def subset(self, idx) -> "QM9Split":
        return QM9Split(
            self.name,
            self.gdb_index[idx],
            self.n_atoms[idx],
            self.atom_types[idx],
            self.positions[idx],
            self.smiles[idx],
        )


def edm_split_positions(n: int = N_QM9) -> dict[str, np.ndarray]:
    """EDM's split as positions into the gdb-sorted molecule list, each split ascending."""
    perm = np.random.RandomState(0).permutation(n)
    n_test = int(0.1 * n)
    n_train = N_TRAIN
    n_valid = n - n_train - n_test
    return {
        "train": np.sort(perm[:n_train]),
        "valid": np.sort(perm[n_train : n_train + n_valid]),
        "test": np.sort(perm[n_train + n_valid :]),
    }


def qm9pack_data_dir() -> Path:
    """The data folder of the installed qm9pack wheel, found without importing qm9pack."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the qm9pack package is not installed: pip install qm9pack")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [f for f in CSV_FILES if not (data / f).is_file()]
    if missing:
        raise FileNotFoundError(f"qm9pack data folder {data} lacks {missing}")
    return data


def cache_dir() -> Path:
    if os.environ.get("SDE_MOL_CACHE"):
        return Path(os.environ["SDE_MOL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "sde_mol"


def _parse_float_list(text: str, where: str) -> list[float]:
    body = text.replace("[", " ").replace("]", " ")
    try:
        return [float(tok) for tok in body.split(",") if tok.strip()]
    except ValueError as err:
        raise QM9FormatError(f"{where}: field XYZ_Ang: expected a nested list of numbers, got {err}") from None


def _parse_row(row: dict, where: str):
    try:
        index = int(row["Index"])
        n = int(row["N_atoms"])
    except (KeyError, ValueError) as err:
        raise QM9FormatError(f"{where}: fields Index/N_atoms: expected integers ({err})") from None
    elements = [e.strip().strip("'\"") for e in row["Elements"].strip("[] ").split(",")]
    coords = _parse_float_list(row["XYZ_Ang"], where)
    if len(elements) != n or len(coords) != 3 * n:
        raise QM9FormatError(
            f"{where}: expected {n} elements and {3 * n} coordinates, got {len(elements)} and {len(coords)}"
        )
    unknown = sorted(set(elements) - set(ATOM_DECODER))
    if unknown:
        raise QM9FormatError(f"{where}: field Elements: unknown elements {unknown}, expected {ATOM_DECODER}")
    types = [ATOM_DECODER.index(e) for e in elements]
    return index, n, types, coords, row["SMILES"]


def parse_qm9pack(data_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Parse every molecule of the wheel's CSV files, sorted by gdb index."""
    data_dir = data_dir or qm9pack_data_dir()
    csv.field_size_limit(1 << 30)
    rows = []
    for name in CSV_FILES:
        path = data_dir / name
        with open(path, newline="") as f:
            for line_no, row in enumerate(csv.DictReader(f), start=2):
                rows.append(_parse_row(row, f"{path}:{line_no}"))
    rows.sort(key=lambda r: r[0])
    n = len(rows)
    gdb = np.array([r[0] for r in rows], dtype=np.int32)
    if np.any(np.diff(gdb) == 0):
        raise QM9FormatError(f"{data_dir}: duplicate gdb indices")
    n_atoms = np.array([r[1] for r in rows], dtype=np.int32)
    if n_atoms.max() > MAX_N_ATOMS:
        raise QM9FormatError(f"{data_dir}: a molecule has {n_atoms.max()} atoms, more than {MAX_N_ATOMS}")
    atom_types = np.full((n, MAX_N_ATOMS), -1, dtype=np.int8)
    positions = np.zeros((n, MAX_N_ATOMS, 3), dtype=np.float32)
    for i, (_, m, types, coords, _) in enumerate(rows):
        atom_types[i, :m] = types
        positions[i, :m] = np.asarray(coords, dtype=np.float64).reshape(m, 3)
    smiles = np.array([r[4] for r in rows])
    return {
        "gdb_index": gdb,
        "n_atoms": n_atoms,
        "atom_types": atom_types,
        "positions": positions,
        "smiles": smiles,
    }


_ARRAY_KEYS = ("gdb_index", "n_atoms", "atom_types", "positions", "smiles")


def _source_fingerprint(data_dir: Path) -> str:
    parts = [f"format={CACHE_FORMAT}"]
    for name in CSV_FILES:
        st = (data_dir / name).stat()
        parts.append(f"{name}:{st.st_size}:{int(st.st_mtime)}")
    return ";".join(parts)


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in _ARRAY_KEYS:
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write_cache(path: Path, arrays: dict[str, np.ndarray], fingerprint: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, fingerprint=np.array(fingerprint), checksum=np.array(_checksum(arrays)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_cache(path: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None (with the reason) if the cache is absent, stale or corrupt."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            arrays = {k: z[k] for k in _ARRAY_KEYS}
            stored = str(z["checksum"])
    except Exception:  # truncated zip, missing key, bad header: all mean "rebuild"
        return None
    if _checksum(arrays) != stored:
        return None
    return arrays


def load_qm9_arrays(verbose: bool = False) -> dict[str, np.ndarray]:
    """All 130,831 molecules sorted by gdb index, from the cache (rebuilt when absent, stale or corrupt)."""
    data_dir = qm9pack_data_dir()
    fingerprint = _source_fingerprint(data_dir)
    path = cache_dir() / f"qm9pack_v{CACHE_FORMAT}.npz"
    arrays = _read_cache(path, fingerprint)
    if arrays is None:
        t0 = time.perf_counter()
        arrays = parse_qm9pack(data_dir)
        if len(arrays["gdb_index"]) != N_QM9:
            raise QM9FormatError(f"{data_dir}: expected {N_QM9} molecules, found {len(arrays['gdb_index'])}")
        _write_cache(path, arrays, fingerprint)
        if verbose:
            print(f"parsed QM9 from {data_dir} in {time.perf_counter() - t0:.1f}s; cached at {path}")
    return arrays


def load_qm9(split: str = "train") -> QM9Split:
    """One EDM split of QM9 (or "all"), in ascending gdb order."""
    arrays = load_qm9_arrays()
    if split == "all":
        idx = np.arange(N_QM9)
    else:
        splits = edm_split_positions(N_QM9)
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; expected one of train, valid, test, all")
        idx = splits[split]
    return QM9Split(split, *(arrays[k][idx] for k in _ARRAY_KEYS))


def qm9_info(train: QM9Split | None = None) -> DatasetInfo:
    """DatasetInfo with p(M) from the train split (EDM's histogram, which the tests check equals the data)."""
    if train is None:
        counts = np.zeros(MAX_N_ATOMS + 1, dtype=np.int64)
        for m, c in EDM_TRAIN_SIZE_COUNTS.items():
            counts[m] = c
        return DatasetInfo(size_counts=tuple(int(c) for c in counts))
    return DatasetInfo(size_counts=size_counts_from(train.n_atoms))
