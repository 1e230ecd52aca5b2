"""sde_mol/nn/torch_format.py: torch.save archives and argparse pickles read without torch, no pickled code run.

The tests write their own torch-format files with zipfile + pickle: stand-in `torch`, `torch._utils` modules
(in sys.modules only while writing) give the pickler the same globals torch writes."""

import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
from helpers import write_torch_zip

from sde_mol.nn.torch_format import TorchFormatError, read_namespace, read_state_dict


def test_round_trip_of_contiguous_strided_and_offset_tensors(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    flat = rng.normal(size=10).astype(np.float64)
    tensors = {
        "layer.weight": (w, 0, (3, 4), (4, 1)),
        "layer.weight_t": (w, 0, (4, 3), (1, 4)),  # a transposed view of the same numbers
        "vec": (flat, 3, (5,), (1,)),  # offset into its storage
        "steps": (np.array([7], np.int64), 0, (), ()),  # a scalar
        "half": np.array([1.5, -2.25, 3.0], ml_dtypes.bfloat16),  # bfloat16 weights (numpy via ml_dtypes)
    }
    path = write_torch_zip(tmp_path / "model.pt", tensors, root="generative_model_ema")
    sd = read_state_dict(path)
    assert list(sd) == list(tensors)
    np.testing.assert_array_equal(sd["layer.weight"], w)
    np.testing.assert_array_equal(sd["layer.weight_t"], w.T)
    np.testing.assert_array_equal(sd["vec"], flat[3:8])
    assert sd["vec"].dtype == np.float64 and sd["layer.weight"].dtype == np.float32
    assert sd["steps"].shape == () and int(sd["steps"]) == 7
    assert sd["half"].dtype == ml_dtypes.bfloat16 and sd["half"].astype(np.float32).tolist() == [1.5, -2.25, 3.0]


def test_a_pickle_that_calls_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(TorchFormatError, match=r"evil\.pt: refusing pickled global (os|posix)\.system"):
        read_state_dict(path)
    args = tmp_path / "args.pickle"
    args.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(TorchFormatError, match=r"args\.pickle: refusing pickled global (os|posix)\.system"):
        read_namespace(args)
    assert not marker.exists()


def test_broken_archives_name_the_file_and_the_item(tmp_path):
    tensors = {"a": (np.ones(4, np.float32), 0, (4,), (1,)), "b": (np.ones(2, np.float32), 0, (2,), (1,))}
    missing = write_torch_zip(tmp_path / "missing.pt", tensors, drop_storage="1")
    with pytest.raises(TorchFormatError, match=r"missing\.pt: storage 'archive/data/1' is missing"):
        read_state_dict(missing)

    good = write_torch_zip(tmp_path / "good.pt", tensors)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(TorchFormatError, match=r"truncated\.pt"):
        read_state_dict(truncated)

    past_end = write_torch_zip(tmp_path / "past.pt", {"a": (np.ones(4, np.float32), 2, (4,), (1,))})
    with pytest.raises(TorchFormatError, match=r"past\.pt: a tensor of size \(4,\).*reads past its storage"):
        read_state_dict(past_end)

    not_zip = tmp_path / "garbage.npy"
    not_zip.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(TorchFormatError, match=r"garbage\.npy: not a readable zip archive"):
        read_state_dict(not_zip)

    not_dict = write_torch_zip(tmp_path / "list.pt", {}, payload=[1, 2])
    with pytest.raises(TorchFormatError, match=r"list\.pt: holds a list, expected a state dict"):
        read_state_dict(not_dict)


def test_namespace_round_trip(tmp_path, monkeypatch):
    import argparse

    ns = argparse.Namespace(nf=64, n_layers=3, normalize_factors=[1, 4, 10], datadir="qm9/temp", wandb_usr=None)
    path = tmp_path / "args.pickle"
    path.write_bytes(pickle.dumps(ns))
    assert read_namespace(path) == vars(ns)
    path.write_bytes(pickle.dumps({"nf": 64}))
    with pytest.raises(TorchFormatError, match=r"args\.pickle: holds a dict, expected an argparse.Namespace"):
        read_namespace(path)
