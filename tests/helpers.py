"""Helpers shared by several test modules (pytest puts tests/ on sys.path: `from helpers import ...`)."""

import collections
import contextlib
import importlib.util
import io
import pickle
import sys
import types
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def load_script(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str):
    """Import recipes/<name>.py as a module (recipes are scripts, not a package)."""
    return load_script(ROOT / "recipes" / f"{name}.py", f"recipe_{name}")


def load_tool(name: str):
    """Import tools/<name>.py as a module."""
    return load_script(ROOT / "tools" / f"{name}.py", f"tool_{name}")


# --- torch-format files without torch (tests of sde_mol/nn/torch_format.py and the EDM converter) ---------

_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage"}
_STORAGE_NAMES[np.dtype(np.int64)] = "LongStorage"
_STORAGE_NAMES[np.dtype(ml_dtypes.bfloat16)] = "BFloat16Storage"


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _Tensor:
    """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""

    def __init__(self, storage, offset, size, stride, rebuild):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())
        self.rebuild = rebuild

    def __reduce__(self):
        return self.rebuild, self.args


@contextlib.contextmanager
def _fake_torch():
    """Stand-in torch modules (in sys.modules only inside the block) so that pickle writes the globals torch
    writes: `torch._utils._rebuild_tensor_v2` and `torch.FloatStorage`."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: the reader resolves the name to its own stand-in
        raise AssertionError

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in _STORAGE_NAMES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def write_torch_zip(path, tensors: dict, *, root="archive", drop_storage=None, payload=None):
    """A torch.save-format zip (no torch needed) of `tensors` {name: (storage array, offset, size, stride)} or
    {name: array}; `payload` replaces the state dict by any picklable object; `drop_storage` leaves one storage
    file out."""
    with _fake_torch() as torch:
        return _write_torch_zip(path, tensors, torch, root, drop_storage, payload)


def _write_torch_zip(path, tensors, torch, root, drop_storage, payload):
    storages, state = {}, collections.OrderedDict()
    for name, entry in tensors.items():
        array, offset, size, stride = entry if isinstance(entry, tuple) else (entry, 0, entry.shape, _strides(entry))
        key = str(len(storages))
        storages[key] = _Storage(key, np.ascontiguousarray(array).ravel())
        state[name] = _Tensor(storages[key], offset, size, stride, torch._utils._rebuild_tensor_v2)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                kind = getattr(torch, _STORAGE_NAMES[obj.array.dtype])
                return ("storage", kind, obj.key, "cpu", obj.array.size)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state if payload is None else payload)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{root}/data.pkl", buf.getvalue())
        zf.writestr(f"{root}/byteorder", "little")
        for key, storage in storages.items():
            if key != drop_storage:
                zf.writestr(f"{root}/data/{key}", storage.array.astype(storage.array.dtype.newbyteorder("<")).tobytes())
    return path


def _strides(array: np.ndarray) -> tuple[int, ...]:
    return tuple(s // array.itemsize for s in np.ascontiguousarray(array).strides)
