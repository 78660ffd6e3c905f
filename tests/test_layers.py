"""The layers flow one way (docs/ARCHITECTURE.md): every import, inside functions too, points down, and no
modules import each other in a circle."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["sami", "actors", "evals", "pipelines", "cluster", "benchmarks"]  # bottom to top


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (package imports resolved to the package's __init__)."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for layer in LAYERS for p in (REPO / layer).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] + [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module else []
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_every_import_points_down():
    up = [f"{m} imports {t}" for m, targets in project_imports().items() for t in targets
          if LAYERS.index(t.split(".")[0]) > LAYERS.index(m.split(".")[0])]
    assert not up, up


def test_no_circles_of_modules():
    graph, state, circles = project_imports(), {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_the_evaluation_job_never_imports_the_training_job():
    assert not [(m, t) for m, targets in project_imports().items() if m.startswith("evals") for t in targets
                if t.startswith("pipelines")]
