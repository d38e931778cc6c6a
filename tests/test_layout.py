"""The layout of common/: no module imports another that imports it back, at any depth."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every common.* module a file imports, at top level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("common"):
            for alias in node.names:  # `from common.views import resample` names a module
                sub = f"{node.module}.{alias.name}"
                out.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("common"))
    return out


def test_common_has_no_import_cycle():
    graph = {".".join(p.relative_to(ROOT).with_suffix("").parts): _imports(p) for p in (ROOT / "common").rglob("*.py")}
    assert "common.views.photometric" in graph and "common.engine.train" in graph

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = [m for m in graph if m in reach(m)]
    assert not cycles, f"modules on an import cycle: {cycles}"
