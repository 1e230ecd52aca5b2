"""XYZ and SDF files of molecules, to and from the host-side arrays used everywhere else.

Arrays: positions (B, N, 3) in Angstrom and atom types (B, N) indexing an atom decoder (QM9: H, C, N, O, F),
-1 on padding. Readers pad to the largest molecule read (or to a given `capacity`); real atoms come first.

XYZ: per molecule an atom-count line, a comment line and one `El x y z` line per atom; a multi-molecule file is
such blocks concatenated (blank lines between blocks are allowed). SDF is written and parsed by RDKit; its bonds
are the ones the metrics infer from distances (`sde_mol.metrics.bond_orders`), and the reader ignores bonds.
A malformed file raises `MoleculeFileError` naming the file, the 1-based line and what was expected; an element
outside the decoder is an error, never guessed.
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import Float, Int
from rdkit import Chem, rdBase

from .data.qm9 import ATOM_DECODER
from .metrics import bond_orders, to_rdkit
from .typing import NpAtomTypes, NpPositions

ReadResult = tuple[Float[np.ndarray, "batch n_atoms 3"], Int[np.ndarray, "batch n_atoms"]]


class MoleculeFileError(ValueError):
    """A molecule file does not have the expected content; the message starts with `file:line:`."""


def _real(atom_types: np.ndarray, atom_decoder: Sequence[str]) -> list[np.ndarray]:
    types = np.asarray(atom_types)
    if types.size and (types.min() < -1 or types.max() >= len(atom_decoder)):
        raise ValueError(f"atom types must lie in [-1, {len(atom_decoder) - 1}], got [{types.min()}, {types.max()}]")
    return [np.flatnonzero(t >= 0) for t in types]


def write_xyz(
    path: str | Path,
    positions: NpPositions,
    atom_types: NpAtomTypes,
    comments: Sequence[str] | None = None,
    atom_decoder: Sequence[str] = ATOM_DECODER,
) -> None:
    """Write every molecule of the batch into one (multi-molecule) XYZ file, coordinates with 8 decimals."""
    pos = np.asarray(positions, dtype=np.float64)
    out = []
    for b, real in enumerate(_real(atom_types, atom_decoder)):
        comment = comments[b] if comments is not None else f"molecule {b}"
        if "\n" in comment or not len(real):
            raise ValueError(f"molecule {b}: XYZ needs at least one atom and a one-line comment")
        out += [str(len(real)), comment]
        for i in real:
            x, y, z = pos[b, i]
            out.append(f"{atom_decoder[atom_types[b, i]]:<2s} {x:14.8f} {y:14.8f} {z:14.8f}")
    Path(path).write_text("\n".join(out) + "\n")


def write_sdf(
    path: str | Path,
    positions: NpPositions,
    atom_types: NpAtomTypes,
    names: Sequence[str] | None = None,
    atom_decoder: Sequence[str] = ATOM_DECODER,
    properties: Sequence[dict] | None = None,
) -> None:
    """Write every molecule of the batch into one SDF file (RDKit, unsanitised, bonds = `bond_orders`);
    `properties[b]` ({name: value}) become the SDF data fields `> <name>` of record b."""
    orders = bond_orders(positions, atom_types, atom_decoder)
    writer = Chem.SDWriter(str(path))
    writer.SetKekulize(False)
    try:
        for b in range(orders.shape[0]):
            mol = to_rdkit(positions[b], atom_types[b], orders[b], atom_decoder)
            mol.UpdatePropertyCache(strict=False)  # no sanitisation: invalid molecules are written as they are
            mol.SetProp("_Name", names[b] if names is not None else f"molecule {b}")
            for name, value in (properties[b] if properties is not None else {}).items():
                mol.SetProp(name, str(value))
            writer.write(mol)
    finally:
        writer.close()


def write_molecules(
    folder: str | Path,
    positions: NpPositions,
    atom_types: NpAtomTypes,
    fmt: Literal["xyz", "sdf"] = "xyz",
    prefix: str = "mol",
    atom_decoder: Sequence[str] = ATOM_DECODER,
) -> list[Path]:
    """One file per molecule, `folder/{prefix}_{index:05d}.{fmt}` (sorted by name = batch order)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write = {"xyz": write_xyz, "sdf": write_sdf}[fmt]
    width = max(5, len(str(len(positions) - 1)))
    paths = []
    for b in range(len(positions)):
        p = folder / f"{prefix}_{b:0{width}d}.{fmt}"
        write(p, positions[b : b + 1], atom_types[b : b + 1], atom_decoder=atom_decoder)
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------------------
# Readers. Each parser yields (line, types (n,), positions (n, 3)) per molecule; `line` is where it starts.


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise MoleculeFileError(f"{path}: expected a text file ({err.reason} at byte {err.start})") from None


def _element(symbol: str, atom_decoder: Sequence[str], where: str) -> int:
    if symbol not in atom_decoder:
        raise MoleculeFileError(f"{where}: unknown element {symbol!r}, expected one of {', '.join(atom_decoder)}")
    return atom_decoder.index(symbol)


def _coordinate(text: str, axis: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise MoleculeFileError(f"{where}: expected a finite number for coordinate {axis}, got {text!r}")
    return value


def _parse_xyz(path: Path, atom_decoder: Sequence[str]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    lines = _lines(path)
    mols, i = [], 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        fields = lines[i].split()
        if len(fields) != 1 or not fields[0].isdigit() or int(fields[0]) == 0:
            raise MoleculeFileError(
                f"{path}:{i + 1}: expected an atom count line (one positive integer), got {lines[i]!r}"
            )
        n, start = int(fields[0]), i + 1
        if start + 1 + n > len(lines):
            found = max(0, len(lines) - start - 1)
            raise MoleculeFileError(
                f"{path}:{len(lines) + 1}: expected {n} atom lines after the count on line {start} and a comment "
                f"line, but the file ends after {found} atom line(s)"
            )
        types, xyz = np.empty(n, dtype=np.int64), np.empty((n, 3), dtype=np.float64)
        for k in range(n):
            ln = start + 2 + k
            where, fields = f"{path}:{ln}", lines[ln - 1].split()
            if len(fields) != 4:
                raise MoleculeFileError(f"{where}: expected 4 fields 'element x y z', got {len(fields)}")
            types[k] = _element(fields[0], atom_decoder, where)
            xyz[k] = [_coordinate(v, a, where) for v, a in zip(fields[1:], "xyz", strict=True)]
        mols.append((start, types, xyz))
        i = start + 1 + n
    if not mols:
        raise MoleculeFileError(f"{path}:1: expected an atom count line, got an empty file")
    return mols


def _sdf_records(lines: list[str]) -> list[tuple[int, list[str]]]:
    """(1-based first line, lines) of every record; a record ends with a `$$$$` line."""
    records, block, start = [], [], 1
    for ln, line in enumerate(lines, start=1):
        if line.strip() == "$$$$":
            records.append((start, block))
            block, start = [], ln + 1
        else:
            block.append(line)
    if any(line.strip() for line in block):
        records.append((start, block))
    return records


def _check_v2000_elements(path: Path, start: int, block: list[str], atom_decoder: Sequence[str]) -> None:
    """Report an unknown element at its own line (V2000 atom block: symbol in columns 32-34)."""
    if len(block) < 4 or "V2000" not in block[3]:
        return
    try:
        n = int(block[3][:3])
    except ValueError:
        raise MoleculeFileError(f"{path}:{start + 3}: expected a V2000 counts line, got {block[3]!r}") from None
    for k in range(min(n, len(block) - 4)):
        line, where = block[4 + k], f"{path}:{start + 4 + k}"
        if len(line) < 34 or not line[31:34].strip():
            raise MoleculeFileError(
                f"{where}: expected a V2000 atom line (x, y, z, element in columns 32-34), got {line!r}"
            )
        _element(line[31:34].strip(), atom_decoder, where)


def _parse_sdf(path: Path, atom_decoder: Sequence[str]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    records = _sdf_records(_lines(path))
    if not records:
        raise MoleculeFileError(f"{path}:1: expected at least one molecule record, got an empty file")
    mols = []
    for start, block in records:
        _check_v2000_elements(path, start, block, atom_decoder)
        with rdBase.BlockLogs():
            mol = Chem.MolFromMolBlock("\n".join(block), sanitize=False, removeHs=False, strictParsing=True)
        if mol is None or mol.GetNumAtoms() == 0 or mol.GetNumConformers() == 0:
            raise MoleculeFileError(
                f"{path}:{start}: expected a mol block (header, counts line, atom and bond blocks, 'M  END') "
                "with at least one atom; RDKit could not read it"
            )
        where = f"{path}:{start}"
        types = np.array([_element(a.GetSymbol(), atom_decoder, where) for a in mol.GetAtoms()], dtype=np.int64)
        mols.append((start, types, mol.GetConformer().GetPositions()))
    return mols


_PARSERS = {".xyz": _parse_xyz, ".sdf": _parse_sdf}


def _collect(mols: list, capacity: int | None) -> ReadResult:
    """Pad (file, line, types, positions) entries into arrays, checking the capacity."""
    cap = capacity if capacity is not None else max(len(t) for _, _, t, _ in mols)
    positions = np.zeros((len(mols), cap, 3), dtype=np.float32)
    types = np.full((len(mols), cap), -1, dtype=np.int64)
    for b, (path, line, t, x) in enumerate(mols):
        if len(t) > cap:
            raise MoleculeFileError(f"{path}:{line}: molecule has {len(t)} atoms, more than the capacity {cap}")
        positions[b, : len(t)], types[b, : len(t)] = x, t
    return positions, types


def read_xyz(path: str | Path, capacity: int | None = None, atom_decoder: Sequence[str] = ATOM_DECODER) -> ReadResult:
    """All molecules of an XYZ file, padded to `capacity` (default: the largest molecule)."""
    path = Path(path)
    return _collect([(path, *m) for m in _parse_xyz(path, atom_decoder)], capacity)


def read_sdf(path: str | Path, capacity: int | None = None, atom_decoder: Sequence[str] = ATOM_DECODER) -> ReadResult:
    """All molecules of an SDF file (atoms and coordinates; bonds are ignored), padded like `read_xyz`."""
    path = Path(path)
    return _collect([(path, *m) for m in _parse_sdf(path, atom_decoder)], capacity)


def read_molecules(
    path: str | Path, capacity: int | None = None, atom_decoder: Sequence[str] = ATOM_DECODER
) -> ReadResult:
    """Molecules from one .xyz/.sdf file, or from every .xyz/.sdf file of a folder (sorted by name, each file's
    molecules in file order), padded to `capacity` (default: the largest molecule)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _PARSERS and p.is_file())
        if not files:
            raise MoleculeFileError(f"{path}: expected .xyz or .sdf files in this folder, found none")
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    elif path.suffix.lower() not in _PARSERS:
        raise MoleculeFileError(f"{path}: expected a .xyz or .sdf file or a folder of them")
    else:
        files = [path]
    return _collect([(f, *m) for f in files for m in _PARSERS[f.suffix.lower()](f, atom_decoder)], capacity)
