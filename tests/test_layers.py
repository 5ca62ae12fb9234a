"""The package's layers point one way: a module imports only from its own layer or lower ones (lazy imports inside
functions count too), no module imports itself back through others (no cycle), no module grows past the size a
newcomer can read. The layers are those of docs/ARCHITECTURE.md."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "appliance"

#: lowest first; a module belongs to the first layer with a prefix that matches its dotted name
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("appliance.domain", "appliance.durable", "appliance.errors", "appliance.geometry", "appliance.imaging",
              "appliance.malloc", "appliance.config", "appliance.privacy", "appliance.jpeg_lossless",
              "appliance.uid_names", "appliance.dicom_names", "appliance.__init__", "appliance")),
    ("pure pipeline", ("appliance.pipeline.case_logic", "appliance.pipeline.tracker", "appliance.pipeline.anatomy",
                       "appliance.pipeline.solid", "appliance.pipeline.solid_lesions", "appliance.pipeline.grading",
                       "appliance.pipeline.foci", "appliance.pipeline.crop_window", "appliance.pipeline.classic_lung",
                       "appliance.pipeline.noise", "appliance.pipeline.coverage", "appliance.pipeline.halo_core",
                       "appliance.pipeline.mass_foci", "appliance.pipeline.grade_text", "appliance.pipeline.opacity",
                       "appliance.pipeline.__init__")),
    ("inputs and runtimes", ("appliance.ingest", "appliance.inference", "appliance.resample", "appliance.phantom")),
    ("models", ("appliance.pipeline",)),
    ("outputs and tools", ("appliance.publish", "appliance.store", "appliance.fleet", "appliance.display",
                           "appliance.oneshot", "appliance.evaluate", "appliance.metrics", "appliance.report",
                           "appliance.bench", "appliance.embedded_broker")),
    ("service", ("appliance.service", "appliance.daemon")),
    ("command line", ("appliance.commands", "appliance.cli")),
]
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        out[".".join(rel.parts)] = p
    return out


def _layer(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if pre == "appliance" and name != "appliance":
                continue
            if name == pre or name.startswith(pre + "."):
                return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def test_no_module_imports_from_a_higher_layer():
    bad = []
    for name, deps in sorted(_graph().items()):
        for d in sorted(deps):
            if d == "appliance":  # the package itself: its __version__
                continue
            if _layer(d) > _layer(name):
                bad.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {d} ({LAYERS[_layer(d)][0]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if d == "appliance" or d.endswith(".__init__"):
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "\n".join(" → ".join(c) for c in cycles)


def test_no_module_is_longer_than_a_newcomer_can_read():
    long = {name: n for name, p in _modules().items()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
