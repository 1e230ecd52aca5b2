import os

import numpy as np
import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="session")
def fixture_npz():
    """The EDM reference parity fixture (see ../shared/fixtures/README.md, copied into tests/data)."""
    with np.load(os.path.join(DATA, "edm_parity_small.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
