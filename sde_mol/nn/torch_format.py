"""Read PyTorch files without PyTorch and without running pickled code.

Two formats, both as the EDM reference writes them:

* a `torch.save` zip archive of a state dict (EDM names it `generative_model_ema.npy`): `<root>/data.pkl` is a
  pickle whose tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls on
  persistent ids `("storage", torch.FloatStorage, key, location, numel)`, and each storage is the raw bytes
  `<root>/data/<key>` in the byte order of `<root>/byteorder` (little when absent);
* a pickled `argparse.Namespace` (EDM's `args.pickle`).

Both unpicklers resolve only the globals a state dict or a Namespace needs (`ALLOWED_STATE_DICT_GLOBALS`,
`argparse.Namespace`) to local stand-ins: any other global is refused with `TorchFormatError` naming the file and
the global, so no code from the file ever runs. Tensors come back as numpy arrays (copies, bounds checked).
"""

import collections
import io
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np


class TorchFormatError(ValueError):
    """A file that is not a readable torch state dict / argparse Namespace; the message names the file."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
ALLOWED_STATE_DICT_GLOBALS = (
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    *(("torch", name) for name in _STORAGE_DTYPES),
)


class _StorageType:
    """Stand-in for `torch.<X>Storage` in a persistent id: carries only the dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, *, path: Path, read_storage):
        super().__init__(io.BytesIO(data))
        self.path = path
        self.read_storage = read_storage

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad=False, hooks=None: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchFormatError(
            f"{self.path}: refusing pickled global {module}.{name} (a state dict needs only "
            f"{', '.join('.'.join(g) for g in ALLOWED_STATE_DICT_GLOBALS[:3])} and torch.<X>Storage)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFormatError(f"{self.path}: unexpected persistent id {pid!r} (expected a storage record)")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise TorchFormatError(f"{self.path}: malformed storage record {pid!r}")
        return self.read_storage(str(key), storage_type.dtype, numel)

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if not isinstance(storage, np.ndarray):
            raise TorchFormatError(f"{self.path}: a tensor is built on {type(storage).__name__}, not a storage")
        size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
            raise TorchFormatError(f"{self.path}: malformed tensor (offset {offset}, size {size}, stride {stride})")
        if 0 in size:
            return np.zeros(size, storage.dtype)
        extent = int(offset) + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
        if extent > storage.size:
            raise TorchFormatError(
                f"{self.path}: a tensor of size {size} (offset {offset}, stride {stride}) reads past its storage "
                f"of {storage.size} elements"
            )
        view = np.lib.stride_tricks.as_strided(
            storage[int(offset) :], shape=size, strides=tuple(s * storage.itemsize for s in stride), writeable=False
        )
        return np.array(view)


def _archive_root(names: list[str], path: Path) -> str:
    roots = [n[: -len("data.pkl")] for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise TorchFormatError(f"{path}: not a torch.save archive (expected one <root>/data.pkl, found {len(roots)})")
    return roots[0]


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save` zip archive of a state dict, as numpy arrays (no torch needed)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            root = _archive_root(names, path)
            order = zf.read(root + "byteorder").decode().strip() if root + "byteorder" in names else "little"
            if order not in ("little", "big"):
                raise TorchFormatError(f"{path}: byteorder {order!r}, expected 'little' or 'big'")

            cache: dict[str, np.ndarray] = {}

            def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
                name = f"{root}data/{key}"
                if name in cache and cache[name].dtype == dtype and cache[name].size == numel:
                    return cache[name]
                if name not in names:
                    raise TorchFormatError(f"{path}: storage {name!r} is missing from the archive")
                raw = zf.read(name)
                if len(raw) < numel * dtype.itemsize:
                    raise TorchFormatError(
                        f"{path}: storage {name!r} holds {len(raw)} bytes, {numel} x {dtype} need "
                        f"{numel * dtype.itemsize}"
                    )
                cache[name] = np.frombuffer(raw, dtype.newbyteorder("<" if order == "little" else ">"), count=numel)
                return cache[name]

            obj = _StateDictUnpickler(zf.read(root + "data.pkl"), path=path, read_storage=read_storage).load()
    except zipfile.BadZipFile as e:
        raise TorchFormatError(f"{path}: not a readable zip archive ({e}); expected a torch.save file") from e
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as e:
        raise TorchFormatError(f"{path}: data.pkl is not a readable state dict pickle ({e})") from e
    if not isinstance(obj, dict):
        raise TorchFormatError(f"{path}: holds a {type(obj).__name__}, expected a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise TorchFormatError(f"{path}: state dict entries {bad[:3]} are not named tensors")
    return {k: v.astype(v.dtype.newbyteorder("=")) for k, v in obj.items()}


class _Namespace:
    """Stand-in for `argparse.Namespace`: unpickling fills its __dict__."""


class _NamespaceUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, *, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("argparse", "Namespace"):
            return _Namespace
        raise TorchFormatError(f"{self.path}: refusing pickled global {module}.{name} (expected an argparse.Namespace)")

    def persistent_load(self, pid):
        raise TorchFormatError(f"{self.path}: unexpected persistent id {pid!r} in an argparse Namespace")


def read_namespace(path: Path) -> dict:
    """The settings of a pickled `argparse.Namespace` (EDM's args.pickle) as a plain dict."""
    path = Path(path)
    try:
        obj = _NamespaceUnpickler(path.read_bytes(), path=path).load()
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, ValueError) as e:
        if isinstance(e, TorchFormatError):
            raise
        raise TorchFormatError(f"{path}: not a readable pickled argparse.Namespace ({e})") from e
    if not isinstance(obj, _Namespace):
        raise TorchFormatError(f"{path}: holds a {type(obj).__name__}, expected an argparse.Namespace")
    return dict(vars(obj))
