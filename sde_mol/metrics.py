"""Sample-quality metrics of EDM (Hoogeboom et al. 2022): stability, RDKit validity, uniqueness, novelty.

Molecules are host-side numpy arrays: positions (B, N, 3) in Angstrom and atom types (B, N) indexing an atom
decoder (QM9: H, C, N, O, F), -1 on padding. Real atoms need not be a prefix.

Bond orders come from interatomic distances alone. With d = 100 * |x_i - x_j| in pm (float32) and the
tabulated lengths s, d2, d3 of the element pair (single, double, triple; margins 10, 5, 3 pm):

    order = 0 if d >= s + 10;  1 if d < s + 10;  2 if also d < d2 + 5;  3 if also d < d3 + 3

(all strict; pairs without a double/triple entry stop at 1/2). An atom is stable iff the sum of its bond
orders equals the element's allowed valence (H 1, C 4, N 3, O 2, F 1; no charges). Atom stability pools stable
atoms over all atoms of all molecules; molecule stability is the fraction of molecules with every atom stable.

RDKit validity: a molecule is built with one atom per real atom (hydrogens included) and a single/double/triple
bond for every pair of order > 0, no charges; it is valid iff `Chem.SanitizeMol` succeeds. For a valid
molecule the canonical SMILES of its largest fragment (most atoms, first on ties; explicit [H] kept) is
recorded. Uniqueness = distinct valid SMILES / valid; valid-and-unique = distinct valid SMILES / generated;
novelty = fraction of the distinct valid SMILES absent from the training-set SMILES, which `train_smiles`
produces with the same build-from-distances pipeline on whole train molecules.
"""

import hashlib
import multiprocessing
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import rdkit
from jaxtyping import Bool, Float, Int
from rdkit import Chem, rdBase
from rdkit.Geometry import Point3D

from .data.qm9 import ATOM_DECODER, cache_dir, load_qm9
from .typing import NpAtomTypes, NpPositions

# Bond lengths in pm (EDM's tables restricted to the QM9 elements); symmetric, so one entry per pair.
BOND_SINGLE = {
    ("H", "H"): 74, ("H", "C"): 109, ("H", "N"): 101, ("H", "O"): 96, ("H", "F"): 92,
    ("C", "C"): 154, ("C", "N"): 147, ("C", "O"): 143, ("C", "F"): 135,
    ("N", "N"): 145, ("N", "O"): 140, ("N", "F"): 136,
    ("O", "O"): 148, ("O", "F"): 142, ("F", "F"): 142,
}  # fmt: skip
BOND_DOUBLE = {("C", "C"): 134, ("C", "N"): 129, ("C", "O"): 120, ("N", "N"): 125, ("N", "O"): 121, ("O", "O"): 121}
BOND_TRIPLE = {("C", "C"): 120, ("C", "N"): 116, ("C", "O"): 113, ("N", "N"): 110}
MARGINS_PM = (10, 5, 3)
ALLOWED_VALENCE = {"H": 1, "C": 4, "N": 3, "O": 2, "F": 1}

# Bump when the build-from-distances pipeline changes: invalidates cached train SMILES.
PIPELINE_VERSION = 1
_BOND_TYPES = (None, Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE)
_CHUNK = 1024  # molecules per vectorised distance block (bounds the (chunk, N, N, 3) temporaries)

SAMPLE_METRICS = (
    "atom_stability",
    "molecule_stability",
    "validity",
    "connected_validity",
    "uniqueness",
    "valid_and_unique",
    "novelty",
)
"""The fractions EDM's protocol reports for a set of molecules, in the order tables print them."""

MATCH_METRICS = ("atom_stability", "molecule_stability", "validity")
"""What `matches` compares."""


def matches(student: dict, teacher: dict, *, n: int, z: float = 2.0) -> bool:
    """Whether `student` is no worse than `teacher` beyond noise: for each of MATCH_METRICS, student >=
    teacher - z * sqrt(2 p (1 - p) / n), the standard error of the difference of two independent fractions of n
    molecules at the teacher's value p (atom stability too is counted per molecule: atoms of one molecule are
    not independent). A missing or NaN value is not a match."""
    if n < 1:
        raise ValueError(f"matches: n = {n} molecules; expected at least 1")
    for k in MATCH_METRICS:
        s, t = float(student.get(k, float("nan"))), float(teacher.get(k, float("nan")))
        if not (np.isfinite(s) and np.isfinite(t)) or s < t - z * np.sqrt(2 * t * (1 - t) / n):
            return False
    return True


def _check_decoder(atom_decoder: Sequence[str]) -> None:
    unknown = [e for e in atom_decoder if e not in ALLOWED_VALENCE]
    if unknown:
        raise ValueError(
            f"no bond-length table for element(s) {unknown}: sde_mol.metrics supports {tuple(ALLOWED_VALENCE)}"
        )


def bond_thresholds(atom_decoder: Sequence[str] = ATOM_DECODER) -> Float[np.ndarray, "3 n_slots n_slots"]:
    """Strict upper distance limits (pm, float32) for orders >= 1, >= 2, >= 3, indexed [k, type_i, type_j].

    The extra last row/column (index -1) is padding and missing table entries are -inf: never bonded."""
    _check_decoder(atom_decoder)
    k = len(atom_decoder)
    thr = np.full((3, k + 1, k + 1), -np.inf, dtype=np.float32)
    for level, (table, margin) in enumerate(zip((BOND_SINGLE, BOND_DOUBLE, BOND_TRIPLE), MARGINS_PM, strict=True)):
        for (a, b), length in table.items():
            if a in atom_decoder and b in atom_decoder:
                i, j = atom_decoder.index(a), atom_decoder.index(b)
                thr[level, i, j] = thr[level, j, i] = length + margin
    return thr


def _check_types(atom_types: np.ndarray, n_types: int) -> np.ndarray:
    types = np.asarray(atom_types).astype(np.intp)
    if types.size and (types.min() < -1 or types.max() >= n_types):
        raise ValueError(
            f"atom types must lie in [-1, {n_types - 1}] (-1 = padding), got [{types.min()}, {types.max()}]"
        )
    return types


def bond_orders(
    positions: NpPositions, atom_types: NpAtomTypes, atom_decoder: Sequence[str] = ATOM_DECODER
) -> Int[np.ndarray, "batch n_atoms n_atoms"]:
    """EDM bond order (0-3) of every pair of real atoms from distances; int8, symmetric, zero on the diagonal
    and on padding. Distances are float32, as in the reference."""
    thr = bond_thresholds(atom_decoder)
    types = _check_types(atom_types, len(atom_decoder))
    pos = np.asarray(positions, dtype=np.float32)
    b, n = types.shape
    out = np.zeros((b, n, n), dtype=np.int8)
    off_diag = ~np.eye(n, dtype=bool)
    for s in range(0, b, _CHUNK):
        p, t = pos[s : s + _CHUNK], types[s : s + _CHUNK]
        diff = p[:, :, None, :] - p[:, None, :, :]
        sq = diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1] + diff[..., 2] * diff[..., 2]
        d = np.float32(100.0) * np.sqrt(sq)
        ti, tj = t[:, :, None], t[:, None, :]
        o1 = (d < thr[0][ti, tj]) & off_diag & (ti >= 0) & (tj >= 0)
        o2 = o1 & (d < thr[1][ti, tj])
        o3 = o2 & (d < thr[2][ti, tj])
        out[s : s + _CHUNK] = o1.astype(np.int8) + o2 + o3
    return out


def _stability_from_orders(orders: np.ndarray, types: np.ndarray, atom_decoder: Sequence[str]) -> dict:
    allowed = np.array([ALLOWED_VALENCE[e] for e in atom_decoder] + [-1], dtype=np.int64)
    real = types >= 0
    valence = orders.sum(axis=-1, dtype=np.int64)
    atom_stable = real & (valence == allowed[types])
    n_real = real.sum(axis=1)
    n_stable = atom_stable.sum(axis=1)
    mol_stable = (n_stable == n_real) & (n_real > 0)
    total = int(n_real.sum())
    return {
        "valence": valence,
        "atom_stable": atom_stable,
        "n_stable_atoms": n_stable,
        "mol_stable": mol_stable,
        "atom_stability": float(n_stable.sum() / total) if total else 0.0,
        "molecule_stability": float(mol_stable.mean()) if len(mol_stable) else 0.0,
    }


def stability(positions: NpPositions, atom_types: NpAtomTypes, atom_decoder: Sequence[str] = ATOM_DECODER) -> dict:
    """EDM stability. Returns `bond_order` (B,N,N), `valence` (B,N), `atom_stable` (B,N) bool,
    `n_stable_atoms` (B,), `mol_stable` (B,) bool (a molecule without atoms is not stable), and the floats
    `atom_stability` (pooled stable atoms / real atoms) and `molecule_stability`."""
    types = _check_types(atom_types, len(atom_decoder))
    orders = bond_orders(positions, atom_types, atom_decoder)
    return {"bond_order": orders, **_stability_from_orders(orders, types, atom_decoder)}


def to_rdkit(
    positions_i: Float[np.ndarray, "n_atoms 3"],
    atom_types_i: Int[np.ndarray, " n_atoms"],
    bond_orders_i: Int[np.ndarray, "n_atoms n_atoms"],
    atom_decoder: Sequence[str] = ATOM_DECODER,
) -> Chem.RWMol:
    """One molecule as an unsanitised RDKit RWMol: an atom per real atom (in slot order, H included), a
    SINGLE/DOUBLE/TRIPLE bond per pair with order 1/2/3, no charges, and a 3D conformer (Angstrom)."""
    types = _check_types(atom_types_i, len(atom_decoder))
    real = np.flatnonzero(types >= 0)
    mol = _build(types[real], np.asarray(bond_orders_i)[np.ix_(real, real)], atom_decoder)
    conf = Chem.Conformer(len(real))
    for k, (x, y, z) in enumerate(np.asarray(positions_i, dtype=np.float64)[real].tolist()):
        conf.SetAtomPosition(k, Point3D(x, y, z))
    conf.Set3D(True)
    mol.AddConformer(conf, assignId=True)
    return mol


def _build(types: np.ndarray, orders: np.ndarray, atom_decoder: Sequence[str]) -> Chem.RWMol:
    """RWMol from the real atoms' types (M,) and their bond-order matrix (M, M)."""
    mol = Chem.RWMol()
    for t in types:
        mol.AddAtom(Chem.Atom(atom_decoder[t]))
    ii, jj = np.nonzero(np.triu(orders, 1))
    for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
        mol.AddBond(i, j, _BOND_TYPES[orders[i, j]])
    return mol


def _largest_fragment_smiles(mol: Chem.RWMol) -> tuple[bool, str, bool]:
    """(valid, SMILES of the largest fragment, connected = valid and one fragment); '' for an invalid molecule
    (or, as a counted-valid edge case of the reference, a largest fragment that fails its own sanitisation)."""
    try:
        Chem.SanitizeMol(mol)
    except ValueError:  # RDKit's MolSanitizeException and its subclasses are ValueErrors
        return False, "", False
    if len(Chem.GetMolFrags(mol)) == 1:
        return True, Chem.MolToSmiles(mol), True
    largest = max(Chem.GetMolFrags(mol, asMols=True), key=lambda m: m.GetNumAtoms())
    try:
        Chem.SanitizeMol(largest)
    except ValueError:
        return True, "", False
    return True, Chem.MolToSmiles(largest), False


def _whole_smiles(mol: Chem.RWMol) -> str | None:
    try:
        Chem.SanitizeMol(mol)
    except ValueError:
        return None
    return Chem.MolToSmiles(mol)


def _per_molecule(positions, atom_types, atom_decoder, fn, orders=None) -> list:
    """Apply `fn` to the RWMol of every molecule; bonds from one vectorised `bond_orders` call."""
    types = _check_types(atom_types, len(atom_decoder))
    if orders is None:
        orders = bond_orders(positions, atom_types, atom_decoder)
    out = []
    with rdBase.BlockLogs():
        for t, o in zip(types, orders, strict=True):
            real = t >= 0
            if not real.any():
                out.append(None)
                continue
            out.append(fn(_build(t[real], o[np.ix_(real, real)], atom_decoder)))
    return out


def rdkit_validity(
    positions: NpPositions, atom_types: NpAtomTypes, atom_decoder: Sequence[str] = ATOM_DECODER
) -> tuple[Bool[np.ndarray, " batch"], list[str]]:
    """Per molecule: RDKit-valid flag and canonical SMILES of the largest fragment ('' if invalid).
    A molecule without atoms is invalid."""
    valid, smiles, _ = _validity(positions, atom_types, atom_decoder, None)
    return valid, smiles


def _validity(positions, atom_types, atom_decoder, orders) -> tuple[np.ndarray, list[str], np.ndarray]:
    res = _per_molecule(positions, atom_types, atom_decoder, _largest_fragment_smiles, orders)
    res = [r if r is not None else (False, "", False) for r in res]
    return np.array([r[0] for r in res], dtype=bool), [r[1] for r in res], np.array([r[2] for r in res], dtype=bool)


def molecule_table(
    positions: NpPositions, atom_types: NpAtomTypes, atom_decoder: Sequence[str] = ATOM_DECODER
) -> dict[str, np.ndarray | list]:
    """EDM's per-molecule results: `n_atoms`, `n_stable_atoms`, `atom_stable_fraction`, `molecule_stable`,
    `valid` (RDKit sanitises the whole molecule; EDM's validity), `connected` (valid and a single fragment: EDM's
    validity counts scattered atoms as valid), `smiles` (largest fragment, '' if invalid). Positions must be
    finite (see `evaluate`)."""
    types = _check_types(atom_types, len(atom_decoder))
    bad = ~np.all(np.isfinite(np.asarray(positions)) | (types < 0)[..., None], axis=(1, 2))
    if np.any(bad):
        raise ValueError(
            f"evaluate: {int(np.sum(bad))} molecule(s) have non-finite positions (first: index "
            f"{int(np.argmax(bad))}); they are failures, not molecules: drop and count them (evaluate_samples does)"
        )
    orders = bond_orders(positions, atom_types, atom_decoder)
    stab = _stability_from_orders(orders, types, atom_decoder)
    valid, smiles, connected = _validity(positions, atom_types, atom_decoder, orders)
    n_atoms = (types >= 0).sum(axis=1)
    return {
        "n_atoms": n_atoms,
        "n_stable_atoms": stab["n_stable_atoms"],
        "atom_stable_fraction": stab["n_stable_atoms"] / np.maximum(n_atoms, 1),
        "molecule_stable": stab["mol_stable"],
        "valid": valid,
        "connected": connected,
        "smiles": smiles,
    }


def scores_from_table(
    table: dict, reference_smiles: set[str] | frozenset[str] | None = None
) -> dict[str, float | int | None]:
    """The batch metrics of `molecule_table` rows: n_molecules, atom_stability (pooled over atoms),
    molecule_stability, validity, connected_validity, uniqueness, valid_and_unique, novelty."""
    n = len(table["smiles"])
    total = int(np.sum(table["n_atoms"]))
    return {
        "n_molecules": n,
        "atom_stability": float(np.sum(table["n_stable_atoms"]) / total) if total else 0.0,
        "molecule_stability": float(np.mean(table["molecule_stable"])) if n else 0.0,
        **smiles_scores(table["valid"], table["smiles"], reference_smiles),
        "connected_validity": float(np.mean(table["connected"])) if n else 0.0,
    }


def smiles_scores(
    valid: Bool[np.ndarray, " batch"], smiles: Sequence[str], reference_smiles: set[str] | frozenset[str] | None = None
) -> dict:
    """validity, uniqueness, valid_and_unique and novelty (None without a reference) from per-molecule flags
    and SMILES. Empty denominators give 0.0."""
    n = len(smiles)
    unique = {s for s, v in zip(smiles, valid, strict=True) if v}
    n_valid = int(np.sum(valid))
    novelty = None
    if reference_smiles is not None:
        novelty = sum(s not in reference_smiles for s in unique) / len(unique) if unique else 0.0
    return {
        "validity": n_valid / n if n else 0.0,
        "uniqueness": len(unique) / n_valid if n_valid else 0.0,
        "valid_and_unique": len(unique) / n if n else 0.0,
        "novelty": novelty,
    }


def evaluate(
    positions: NpPositions,
    atom_types: NpAtomTypes,
    reference_smiles: set[str] | frozenset[str] | None = None,
    atom_decoder: Sequence[str] = ATOM_DECODER,
) -> dict[str, float | int | None]:
    """All EDM sample metrics of a batch: n_molecules, atom_stability, molecule_stability, validity,
    uniqueness, valid_and_unique, novelty (None when `reference_smiles` is None), and connected_validity (valid
    and one fragment). Non-finite positions of a real atom are an error."""
    if np.shape(atom_types)[0] == 0:
        raise ValueError("evaluate: no molecules")
    return scores_from_table(molecule_table(positions, atom_types, atom_decoder), reference_smiles)


def evaluate_samples(
    samples, reference_smiles: set[str] | frozenset[str] | None = None, atom_decoder: Sequence[str] = ATOM_DECODER
) -> dict[str, float | int | None]:
    """`evaluate` on the finite molecules of `samples` (a `samplers.Samples`); `n_nonfinite` counts the others
    (sampler failures: never scored, never written). With no finite molecule every score is None."""
    keep = np.asarray(samples.finite, bool)
    n_bad = int(np.size(keep) - np.count_nonzero(keep))
    if not np.any(keep):
        names = ("atom_stability", "molecule_stability", "validity", "uniqueness", "valid_and_unique", "novelty")
        names += ("connected_validity",)
        return {"n_molecules": 0, "n_nonfinite": n_bad, **dict.fromkeys(names)}
    scores = evaluate(samples.positions[keep], samples.atom_types[keep], reference_smiles, atom_decoder)
    return {**scores, "n_nonfinite": n_bad}


# ---------------------------------------------------------------------------------------------------------
# Training-set SMILES for novelty


def whole_molecule_smiles(
    positions: NpPositions,
    atom_types: NpAtomTypes,
    atom_decoder: Sequence[str] = ATOM_DECODER,
    processes: int = 1,
) -> list[str | None]:
    """Canonical SMILES of each whole molecule (no fragment selection), None where sanitisation fails: the
    reference's pipeline for the training-set SMILES. `processes > 1` splits the batch over worker processes."""
    pos, types = np.asarray(positions, dtype=np.float32), np.asarray(atom_types)
    if processes <= 1 or len(types) < 2000:
        return _per_molecule(pos, types, atom_decoder, _whole_smiles)
    bounds = np.linspace(0, len(types), 4 * processes + 1).astype(int)
    jobs = [(pos[a:b], types[a:b], tuple(atom_decoder)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    # spawn, not fork: the parent may hold JAX's threads
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_whole_smiles_job, jobs))
    return [s for part in parts for s in part]


def _whole_smiles_job(job) -> list:
    pos, types, decoder = job
    return _per_molecule(pos, types, decoder, _whole_smiles)


def _fingerprint(positions: np.ndarray, atom_types: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in (np.ascontiguousarray(positions, dtype=np.float32), np.ascontiguousarray(atom_types, dtype=np.int8)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _smiles_cache_header(split: str, positions: np.ndarray, atom_types: np.ndarray) -> str:
    return (
        f"# sde_mol qm9 {split} SMILES; pipeline={PIPELINE_VERSION}; rdkit={rdkit.__version__}; "
        f"source={_fingerprint(positions, atom_types)}"
    )


def _read_smiles_cache(path, header: str) -> set[str] | None:
    """The cached set, or None if the file is absent or was written for other data / RDKit / pipeline."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    if len(lines) < 2 or lines[0] != header or lines[1] != f"# n={len(lines) - 2}":
        return None
    return set(lines[2:])


def _write_smiles_cache(path, header: str, smiles: set[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join([header, f"# n={len(smiles)}", *sorted(smiles)]) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def train_smiles(split: str = "train", processes: int | None = None, verbose: bool = False) -> set[str]:
    """Distinct whole-molecule SMILES of a QM9 split through the same build-from-distances pipeline (molecules
    failing sanitisation skipped). Cached as text in `cache_dir()`; the header line records the pipeline
    version, the RDKit version and a fingerprint of the split's arrays, and a mismatch triggers a rebuild."""
    data = load_qm9(split)
    header = _smiles_cache_header(split, data.positions, data.atom_types)
    path = cache_dir() / f"qm9_{split}_smiles.txt"
    cached = _read_smiles_cache(path, header)
    if cached is not None:
        return cached
    if verbose:
        print(f"building {split} SMILES for {len(data)} molecules (one-off; cached at {path})", flush=True)
    procs = processes if processes is not None else min(os.cpu_count() or 1, 8)
    smiles = {s for s in whole_molecule_smiles(data.positions, data.atom_types, processes=procs) if s is not None}
    _write_smiles_cache(path, header, smiles)
    return smiles
