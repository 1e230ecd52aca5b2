"""The library-use example of README.md runs as written (its python blocks, in order, in one namespace), and the
molecules it samples land on the toy data (the new SDE is sampled correctly, not just without an error)."""

import re
from pathlib import Path

import jax.numpy as jnp


def test_readme_library_example_runs_and_lands_on_the_data():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Library use") :]
    section = section[: section.index("\n## ", 3)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    data, mol, mask = scope["data"], scope["mol"], scope["mask"]
    rmsd = jnp.sqrt(jnp.sum(((mol.positions - data.positions) * mask[:, None]) ** 2, axis=(-1, -2)) / 7)
    assert float(jnp.min(rmsd)) < 0.05
    assert int(scope["nfe"]) == 501
