"""Checkpoints: one self-describing `.eqx` file per checkpoint. Never pickle.

File layout:

    line 1   a JSON object (UTF-8, one line, ends with b"\\n"), the header:
               format          "sde_mol.checkpoint"
               format_version  1
               kind            what the tree is, e.g. "denoiser", "train_state"
               sde_mol_version the library version that wrote it
               step            training step (0 when not applicable)
               config          a JSON dict sufficient to rebuild the skeleton of the tree
               payload_bytes   length of the payload (detects truncation before parsing it)
               payload_sha256  hex digest of the payload (detects corruption)
    rest     the payload: `eqx.tree_serialise_leaves` of the tree (a sequence of .npy records, one per
             array leaf, depth-first left-to-right; numeric arrays only, so no pickle is involved)

Reading: `read_header(path)` parses and validates the header only; `load(path, like)` deserialises into a
skeleton `like` (arrays or `jax.ShapeDtypeStruct`s); `load_with(path, build)` calls `build(config)` under
`eqx.filter_eval_shape` (no arrays allocated) to obtain that skeleton from the header itself. Every failure
raises `CheckpointError` naming the file and what was expected.

Writing is atomic: the file is written to a temporary name in the same directory, flushed, fsync'ed and then
moved over the target with `os.replace`, so a crash or an exception never leaves a half-written checkpoint
and never damages an existing one.
"""

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ._version import __version__

FORMAT = "sde_mol.checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
_MAX_HEADER_BYTES = 1 << 24  # a header longer than 16 MiB is not one of ours


class CheckpointError(ValueError):
    """A checkpoint file could not be read as what the caller expected."""


def _serialise_leaf(f, x) -> None:
    """`eqx.default_serialise_filter_spec`, except that NumPy arrays are written with `allow_pickle=False`
    (an object array is an error, never a pickle)."""
    if isinstance(x, np.ndarray):
        np.save(f, x, allow_pickle=False)
    else:
        eqx.default_serialise_filter_spec(f, x)


def _describe(error: BaseException) -> str:
    """The message of an exception plus its innermost cause (equinox wraps leaf errors in path errors)."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return str(error) if cause is error else f"{error} ({type(cause).__name__}: {cause})"


def save(path: str | os.PathLike, tree: Any, *, kind: str, config: dict, step: int = 0) -> None:
    """Write `tree` to `path` with a JSON header (atomic: temp file in the same directory, fsync, rename).

    `config` must be JSON-serialisable and sufficient to rebuild the skeleton of `tree` (see `load_with`).
    """
    path = Path(path)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    buffer = io.BytesIO()
    try:  # before anything touches the disk
        eqx.tree_serialise_leaves(buffer, tree, filter_spec=_serialise_leaf)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot serialise the tree: {_describe(e)}") from e
    payload = buffer.getvalue()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": str(kind),
        "sde_mol_version": __version__,
        "step": int(step),
        "config": config,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    line = json.dumps(header, allow_nan=False).encode("utf-8") + b"\n"
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(line)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files that a killed `save` left in `directory` (`.<name>.eqx.*.tmp`); returns them.
    Call it only where no other process is writing checkpoints into the folder (a training run's start)."""
    stale = sorted(Path(directory).glob(".*.eqx.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_header_from(f, path) -> dict:
    line = f.readline(_MAX_HEADER_BYTES)
    if not line.endswith(b"\n"):
        raise CheckpointError(
            f"{path}: not an sde_mol checkpoint or truncated: expected a one-line JSON header ending in a newline"
        )
    try:
        header = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not an sde_mol checkpoint: the first line is not a JSON header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not an sde_mol checkpoint: the JSON header is not an object")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected format {FORMAT!r}, found {header.get('format')!r}")
    version = header.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path}: unsupported format_version {version!r}; this sde_mol reads {list(SUPPORTED_VERSIONS)}"
        )
    for key in ("kind", "step", "config", "payload_bytes"):
        if key not in header:
            raise CheckpointError(f"{path}: the header lacks the key {key!r}")
    return header


def read_header(path: str | os.PathLike) -> dict:
    """The validated JSON header of a checkpoint (format, format_version, kind, sde_mol_version, step,
    config, payload_bytes, payload_sha256)."""
    with open(path, "rb") as f:
        return _read_header_from(f, path)


def _check_kind(header: dict, kind: str | None, path) -> None:
    if kind is not None and header["kind"] != kind:
        raise CheckpointError(f"{path}: expected a checkpoint of kind {kind!r}, found {header['kind']!r}")


def _read_payload(f, header: dict, path) -> bytes:
    expected = header["payload_bytes"]
    payload = f.read()
    if len(payload) != expected:
        raise CheckpointError(
            f"{path}: truncated or altered: the header announces {expected} payload bytes, the file holds "
            f"{len(payload)}"
        )
    digest = header.get("payload_sha256")
    if digest is not None and hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: corrupted: the payload does not match the header's sha256")
    return payload


def _check_finite(tree: Any, path) -> None:
    """Refuse a tree with a NaN or inf in any floating leaf, naming the file and the leaf."""
    for where, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if eqx.is_inexact_array(leaf):
            values = np.asarray(leaf)
            if not np.all(np.isfinite(values)):
                n_bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
                raise CheckpointError(
                    f"{path}: leaf {jax.tree_util.keystr(where)} holds {n_bad} non-finite value(s) (NaN or inf); "
                    "refusing to load it (a diverged training state?)"
                )


def _deserialise(payload: bytes, like: Any, path) -> Any:
    buffer = io.BytesIO(payload)
    try:
        tree = eqx.tree_deserialise_leaves(buffer, like)
    except Exception as e:  # equinox reports the leaf path; numpy reports shape/EOF problems
        raise CheckpointError(f"{path}: the stored leaves do not fit the expected skeleton: {_describe(e)}") from e
    if buffer.tell() != len(payload):
        raise CheckpointError(
            f"{path}: the file holds more leaves than the expected skeleton "
            f"({len(payload) - buffer.tell()} bytes left over)"
        )
    return tree


def load(path: str | os.PathLike, like: Any, *, kind: str | None = None, allow_nonfinite: bool = False) -> Any:
    """Load a checkpoint into the skeleton `like` (same pytree structure; array leaves or
    `jax.ShapeDtypeStruct`s with the stored shapes and dtypes). With `kind`, the header's kind must match.
    A non-finite floating leaf is an error unless `allow_nonfinite` (e.g. to inspect a saved nan_state.eqx)."""
    with open(path, "rb") as f:
        header = _read_header_from(f, path)
        _check_kind(header, kind, path)
        payload = _read_payload(f, header, path)
    tree = _deserialise(payload, like, path)
    if not allow_nonfinite:
        _check_finite(tree, path)
    return tree


def load_with(
    path: str | os.PathLike, build: Callable[[dict], Any], *, kind: str | None = None, allow_nonfinite: bool = False
) -> Any:
    """Load a checkpoint whose skeleton is `build(header["config"])`, evaluated with `eqx.filter_eval_shape`
    (so `build` may construct a full model with random init at no cost). Non-finite leaves as in `load`."""
    with open(path, "rb") as f:
        header = _read_header_from(f, path)
        _check_kind(header, kind, path)
        payload = _read_payload(f, header, path)
    like = eqx.filter_eval_shape(build, header["config"])
    tree = _deserialise(payload, like, path)
    if not allow_nonfinite:
        _check_finite(tree, path)
    return tree
