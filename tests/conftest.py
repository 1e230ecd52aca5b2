import importlib.util
import os

import numpy as np
import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")
# tests compile from scratch and leave no persistent compilation cache behind (test_compile_cache sets its own)
os.environ["SDE_MOL_COMPILE_CACHE"] = "off"


def _keep_freed_memory() -> None:
    """The recipes' allocator settings (sde_mol/host_memory.py) in every test process, before JAX starts. The
    module is loaded by its path: importing the sde_mol package here would import it before jaxtyping's
    import hook (--jaxtyping-packages) is in place, and its functions would go unchecked."""
    path = os.path.join(os.path.dirname(__file__), "..", "sde_mol", "host_memory.py")
    spec = importlib.util.spec_from_file_location("_sde_mol_host_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.keep_freed_memory()


_keep_freed_memory()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after every test module. One pytest process compiles thousands of
    programs; the XLA CPU backend keeps each one's code in its own memory mappings, and the whole default
    suite in one process reached Linux's vm.max_map_count (65530) and crashed in a later compilation (a
    segfault in test_recipes_distill.py, reproduced twice). Modules recompile what they use."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session")
def fixture_npz():
    """The EDM reference parity fixture (see ../shared/fixtures/README.md, copied into tests/data)."""
    with np.load(os.path.join(DATA, "edm_parity_small.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def fixture_reference(fixture_npz):
    """(denoiser, DatasetInfo, node mask) of the fixture's EDM reference model, converted by
    tools/convert_edm_checkpoint.py (the same code path that converts a real EDM checkpoint)."""
    import importlib.util
    import json

    import jax.numpy as jnp

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "convert_edm_checkpoint.py")
    spec = importlib.util.spec_from_file_location("convert_edm_checkpoint_fixture", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    den = tool._fixture_denoiser(fixture_npz)
    info = tool.fixture_info(json.loads(str(fixture_npz["config_json"])))
    return den, info, jnp.asarray(fixture_npz["node_mask"][..., 0] > 0)
