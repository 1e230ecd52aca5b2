"""Pictures of runs and samples (matplotlib; `pip install -e ".[plot]"`).

Usage:
    # (a) a training curve: loss and every logged evaluation metric against the step
    python tools/plot.py curve runs/edm_qm9_finetune/metrics.jsonl --out curve.png
    # (b) quality versus NFE from any set of metrics.json files (recipes/sample.py), one line per method
    python tools/plot.py tradeoff samples/*/metrics.json --out tradeoff.png
    # (b') the same files as a markdown table (NFE, method, stability, validity, V&U, novelty, molecules/s)
    python tools/plot.py table samples/*/metrics.json --out table.md
    # (c) bond-length histograms of samples against QM9's train split, per bond type (C-H, C-C, C=O, ...)
    python tools/plot.py bonds samples/reverse_sde_500_guided/samples.sdf --out bonds.png
    # (d) an RDKit grid image of the first molecules of a file (2D depictions of their largest fragment)
    python tools/plot.py grid samples/reverse_sde_500_guided/samples.sdf --out grid.png

In (b) a method is the run's --label (recipes/sample.py), else the sampler name (and the checkpoint, when the
files come from several): its points are joined in order of NFE, stability and validity on the left axis,
molecules/s (dashed) on the right.
"""

import json
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from rdkit import Chem  # noqa: E402
from rdkit.Chem import Draw  # noqa: E402

from sde_mol import cli, metrics  # noqa: E402
from sde_mol.cli import UsageError  # noqa: E402
from sde_mol.io import read_molecules  # noqa: E402

BOND_SYMBOLS = {1: "-", 2: "=", 3: "#"}


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def curve(metrics_jsonl: Path, /, out: Path = Path("curve.png")) -> Path:
    """Training loss (left) and the evaluations logged in metrics.jsonl (right panels) against the step."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    if not train and not evals:
        raise UsageError(f"{metrics_jsonl}: no training or evaluation rows")
    keys = [
        k for k in ("val_nll", "atom_stability", "molecule_stability", "validity") if any(k in e["eval"] for e in evals)
    ]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.2), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    ax.set(xlabel="step", ylabel="training loss", title=Path(metrics_jsonl).parent.name)
    for ax, key in zip(axes[0, 1:], keys, strict=True):
        pts = [(e["step"], e["eval"][key]) for e in evals if key in e["eval"]]
        ax.plot(*zip(*pts, strict=True), "o-")
        ax.set(xlabel="step", ylabel=key)
    return _save(fig, out)


def _methods(metrics_json: list[Path]) -> dict[str, list[dict]]:
    """metrics.json files of recipes/sample.py grouped by method, each group sorted by NFE: the run's --label,
    else its sampler name (and checkpoint, when the files come from several)."""
    runs = []
    for p in metrics_json:
        r = json.loads(Path(p).read_text())
        missing = [k for k in ("sampler", "nfe", "molecules_per_second", *metrics.MATCH_METRICS) if k not in r]
        if missing:
            raise UsageError(f"{p}: not a metrics.json of recipes/sample.py (no {', '.join(missing)})")
        runs.append(r)
    several = len({Path(str(r.get("checkpoint"))).name for r in runs}) > 1
    methods = defaultdict(list)
    for r in runs:
        name = r.get("label") or r["sampler"]["sampler"] + (f" ({Path(r['checkpoint']).stem})" if several else "")
        methods[name].append(r)
    return {name: sorted(rs, key=lambda r: r["nfe"]) for name, rs in sorted(methods.items())}


def table(metrics_json: list[Path], /, out: Path | None = None) -> str:
    """The same files as a markdown table, ordered by NFE then method: NFE, method, atom / molecule stability,
    validity, V&U, novelty (%), molecules/s and the number of molecules; printed, and written to `out`."""
    head = "| NFE | method | atom stab. | mol. stab. | valid | V&U | novelty | mol/s | molecules |\n" + "|---" * 9 + "|"
    rows = sorted(((r, name) for name, rs in _methods(metrics_json).items() for r in rs), key=lambda x: x[0]["nfe"])

    def pct(v):
        return "" if v is None else f"{100 * v:.1f} %"

    lines = [
        f"| {r['nfe']:.0f} | {name} | {pct(r['atom_stability'])} | {pct(r['molecule_stability'])} | "
        f"{pct(r['validity'])} | {pct(r.get('valid_and_unique'))} | {pct(r.get('novelty'))} | "
        f"{r['molecules_per_second']:.1f} | {r.get('n_molecules', '')} |"
        for r, name in rows
    ]
    text = "\n".join([head, *lines])
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text


def tradeoff(metrics_json: list[Path], /, out: Path = Path("tradeoff.png")) -> Path:
    """Atom / molecule stability and validity against NFE (log x), molecules/s on a second axis."""
    methods = _methods(metrics_json)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)
    for (name, rs), color in zip(methods.items(), plt.cm.tab20.colors, strict=False):
        nfe = [r["nfe"] for r in rs]
        for ax, key in zip(axes, ("atom_stability", "molecule_stability", "validity"), strict=True):
            ax.plot(nfe, [100 * r[key] for r in rs], "o-", color=color, label=name)
            speed = ax.twinx() if not hasattr(ax, "_speed") else ax._speed
            ax._speed = speed
            speed.plot(nfe, [r["molecules_per_second"] for r in rs], "x--", color=color, alpha=0.5)
            speed.set_yscale("log")
            speed.set_ylabel("molecules/s (dashed)")
    for ax, key in zip(axes, ("atom stability %", "molecule stability %", "validity %"), strict=True):
        ax.set(xscale="log", xlabel="NFE (log)", ylabel=key)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=7)
    return _save(fig, out)


def _bond_lengths(positions, atom_types, decoder) -> dict[str, np.ndarray]:
    orders = metrics.bond_orders(positions, atom_types, decoder)
    lengths = defaultdict(list)
    b, i, j = np.nonzero(np.triu(orders, 1))
    d = np.linalg.norm(positions[b, i] - positions[b, j], axis=-1)
    for bb, ii, jj, dd in zip(b, i, j, d, strict=True):
        a1, a2 = sorted((decoder[atom_types[bb, ii]], decoder[atom_types[bb, jj]]), key="CNOFH".index)
        lengths[f"{a1}{BOND_SYMBOLS[int(orders[bb, ii, jj])]}{a2}"].append(dd)
    return {k: np.asarray(v) for k, v in lengths.items()}


def bonds(samples: Path, /, out: Path = Path("bonds.png"), n_reference: int = 5000, n_types: int = 8) -> Path:
    """Histograms of the sampled bond lengths against the first `n_reference` QM9 train molecules, for the
    `n_types` most frequent bond types of the reference (bonds as EDM's metric infers them)."""
    from sde_mol.data.qm9 import load_qm9

    decoder = metrics.ATOM_DECODER
    pos, types = read_molecules(samples)
    ref = load_qm9("train").subset(slice(0, n_reference))
    ours, theirs = _bond_lengths(pos, types, decoder), _bond_lengths(ref.positions, ref.atom_types, decoder)
    kinds = sorted(theirs, key=lambda k: -len(theirs[k]))[:n_types]
    cols = 4
    fig, axes = plt.subplots(-(-len(kinds) // cols), cols, figsize=(14, 3 * -(-len(kinds) // cols)), squeeze=False)
    for ax, kind in zip(axes.flat, kinds, strict=False):
        lo, hi = np.percentile(theirs[kind], [0.5, 99.5])
        bins = np.linspace(lo - 0.1, hi + 0.1, 50)
        ax.hist(theirs[kind], bins=bins, density=True, alpha=0.5, label=f"QM9 ({len(theirs[kind])})")
        if kind in ours:
            ax.hist(ours[kind], bins=bins, density=True, histtype="step", lw=1.5, label=f"samples ({len(ours[kind])})")
        ax.set(title=kind, xlabel="length (A)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    return _save(fig, out)


def grid(samples: Path, /, out: Path = Path("grid.png"), n: int = 24, per_row: int = 6) -> Path:
    """The first `n` molecules of a file, drawn in 2D from the largest fragment's SMILES (invalid ones marked)."""
    pos, types = read_molecules(samples)
    table = metrics.molecule_table(pos[:n], types[:n])
    mols, legends = [], []
    for k, smiles in enumerate(table["smiles"]):
        mol = Chem.MolFromSmiles(smiles) if smiles else None
        mols.append(mol if mol is not None else Chem.Mol())
        stable = "stable" if table["molecule_stable"][k] else "unstable"
        legends.append(f"{k}: {stable}" if mol is not None else f"{k}: invalid")
    image = Draw.MolsToGridImage(mols, molsPerRow=per_row, subImgSize=(220, 180), legends=legends)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out}")
    return out


COMMANDS = {"curve": curve, "tradeoff": tradeoff, "table": table, "bonds": bonds, "grid": grid}

if __name__ == "__main__":
    cli.run(lambda result: result, lambda: tyro.extras.subcommand_cli_from_dict(COMMANDS))
