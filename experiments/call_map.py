"""How many project modules a recipe call passes through, and how often it calls back up the import graph.

Usage:
    python experiments/call_map.py            # both jobs, JSON on stdout

Jobs: `recipes/pf_ode_sample.py --solver heun` (2 molecules, 2 steps) and `recipes/train_edm.py` for one
optimiser step on a tiny model. A profile hook records every Python call whose code lives in sde_mol/ or
recipes/; a call from module A into module B (the nearest project frame below it on the stack) is an edge.
An edge is an "up-call" when B imports A, directly or through other project modules: code reaching back into
a layer built on top of it. Counts are of distinct edges, so loops and tracing repeats do not inflate them.
"""

import ast
import contextlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_of(filename: str) -> str | None:
    path = Path(filename)
    try:
        rel = path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[0] not in ("sde_mol", "recipes") or path.suffix != ".py":
        return None
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (relative and absolute sde_mol imports)."""
    graph = {}
    paths = [*(ROOT / "sde_mol").rglob("*.py"), *(ROOT / "recipes").glob("*.py")]
    modules = {_module_of(str(p)) for p in paths}
    for path in paths:
        name = _module_of(str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from pkg import sub` imports the submodule, `from mod import name` the module
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t.startswith("sde_mol"))
        graph[name] = deps
    known = set(graph)
    return {k: {d for d in v if d in known} - {k} for k, v in graph.items()}


def _closure(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        out[start] = seen
    return out


def trace(fn) -> dict:
    edges: set[tuple[str, str]] = set()
    entered: set[str] = set()

    def hook(frame, event, arg):
        if event != "call":
            return
        callee = _module_of(frame.f_code.co_filename)
        if callee is None:
            return
        entered.add(callee)
        back = frame.f_back
        while back is not None:
            caller = _module_of(back.f_code.co_filename)
            if caller is not None:
                if caller != callee:
                    edges.add((caller, callee))
                return
            back = back.f_back

    sys.setprofile(hook)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the recipes' own output stays off the JSON report
            fn()
    finally:
        sys.setprofile(None)
    deps = _closure(import_graph())
    up = sorted(f"{a} -> {b}" for a, b in edges if a in deps.get(b, ()))
    lib = sorted(m for m in entered if m.startswith("sde_mol"))
    return {"modules": len(lib), "module_list": lib, "edges": len(edges), "up_calls": len(up), "up_list": up}


def sample_job(out: Path):
    sys.path.insert(0, str(ROOT / "recipes"))
    import pf_ode_sample

    cfg = pf_ode_sample.Config(
        solver="heun",
        steps=2,
        n_samples=2,
        batch_size=2,
        out_dir=out / "s",
        novelty=False,
        quiet=True,
        compile_cache=False,
    )
    return lambda: pf_ode_sample.main(cfg)


def train_job(out: Path):
    sys.path.insert(0, str(ROOT / "recipes"))
    import train_edm
    import tyro

    args = [
        "qm9-small",
        "--out-dir",
        str(out / "t"),
        "--train.steps",
        "1",
        "--eval.n-valid",
        "0",
        "--eval.n-samples",
        "0",
        "--train.no-eval-at-start",
        "--data.n-train",
        "256",
        "--spec.model.hidden",
        "16",
        "--spec.model.n-layers",
        "1",
        "--no-compile-cache",
    ]
    cfg = tyro.extras.overridable_config_cli(train_edm.PRESETS, args=args)
    return lambda: train_edm.main(cfg)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        report = {
            name: trace(job(Path(tmp)))
            for name, job in (("pf_ode_sample_heun", sample_job), ("train_edm_one_step", train_job))
        }
    print(json.dumps(report, indent=2))
