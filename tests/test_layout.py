"""The house rules, checked: stages are recipes over the ftkit package and never import each other (or are
imported by it); every ftkit module says in its docstring what it holds; runtime patches of library objects
live in ftkit/patches.py only; no import cycle among ftkit modules and stages; no function over 80 lines."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = ["dataset", "quantization_utils", "finetune", "merge_adapter", "inference", "evaluate", "export_gguf"]
PACKAGE = sorted((REPO / "ftkit").glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another_stage(stage):
    bad = imported_modules(REPO / f"{stage}.py") & (set(STAGES) - {stage})
    assert not bad, f"{stage}.py imports the stage(s) {sorted(bad)}; move what it needs into ftkit/"


@pytest.mark.parametrize("path", PACKAGE, ids=lambda p: p.name)
def test_the_package_depends_on_no_stage_and_says_what_it_holds(path):
    assert not imported_modules(path) & set(STAGES), f"ftkit/{path.name} imports a stage"
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert path.name == "__init__.py" or (doc and len(doc) > 40), f"ftkit/{path.name} has no docstring"


@pytest.mark.parametrize(
    "path",
    [*PACKAGE, *(REPO / f"{s}.py" for s in STAGES), *sorted((REPO / "benchmarks").glob("*.py"))],
    ids=lambda p: p.name,
)
def test_runtime_patches_live_in_one_module(path):
    if path.name == "patches.py":
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                assert not (isinstance(t, ast.Attribute) and t.attr == "__class__"), (
                    f"{path.name}:{node.lineno} swaps a class at runtime; do it in ftkit/patches.py"
                )
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "register_package":
            raise AssertionError(f"{path.name}:{node.lineno} patches torch.serialization; do it in ftkit/patches.py")


def test_benchmarks_and_tests_use_the_package_not_stage_internals():
    """Tests may run a stage (its cli/main, or a subprocess); everything else they use comes from ftkit."""
    for path in [*(REPO / "benchmarks").glob("*.py"), *(REPO / "tests").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in STAGES:
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module in STAGES:
                raise AssertionError(f"{path.name}:{node.lineno} imports names from the stage {node.module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                assert node.attr in ("cli", "main", "__doc__"), (
                    f"{path.name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}; import it from ftkit"
                )


def _module_graph() -> dict[str, set[str]]:
    """ftkit modules and stages -> the ftkit modules and stages each imports (at any depth, relative or not)."""
    files = {f"ftkit.{p.stem}": p for p in PACKAGE if p.stem != "__init__"}
    files.update({s: REPO / f"{s}.py" for s in STAGES})
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ("ftkit." + (node.module or "")).rstrip(".") if node.level else node.module or ""
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)  # `from ftkit import plan`
        graph[name] = deps & set(files) - {name}
    return graph


def test_no_import_cycle():
    graph = _module_graph()
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is walked

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep, [*path, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])


def test_the_package_imports_no_stage_at_any_depth():
    for name, deps in _module_graph().items():
        if name.startswith("ftkit."):
            assert not deps & set(STAGES), f"{name} imports the stage(s) {sorted(deps & set(STAGES))}"


@pytest.mark.parametrize("path", [*PACKAGE, *(REPO / f"{s}.py" for s in STAGES)], ids=lambda p: p.name)
def test_no_function_over_80_lines(path):
    """A longer function is several steps that want names (finetune.main reads as its list of steps)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= 80, f"{path.name}:{node.lineno} {node.name} is {lines} lines; split it into named steps"


def test_training_asks_the_plan_what_runs():
    """World size and FSDP come from plan.world_size/plan.fsdp (decided once, saved in plan.json); train.py reads
    no environment variable of its own (the launcher's facts are read in ftkit/distributed.py)."""
    tree = ast.parse((REPO / "ftkit" / "train.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("environ", "getenv"), f"train.py:{node.lineno} reads the environment"
        if isinstance(node, ast.Name):
            assert node.id != "fsdp_enabled", f"train.py:{node.lineno} asks the environment for FSDP; use plan.fsdp"
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):  # dist_info()["world_size"]
            assert node.slice.value != "world_size", f"train.py:{node.lineno} reads a world size; use plan.world_size"
