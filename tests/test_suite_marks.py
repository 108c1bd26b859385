"""The suite's own bookkeeping: ``-m "not slow"`` skips every subprocess run of a script
(README, Tests; the ``slow`` marker of pyproject.toml: "end-to-end runs of the scripts")."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _marked_slow(node: ast.FunctionDef, module: ast.Module) -> bool:
    module_mark = any(
        isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in stmt.targets)
        and "slow" in ast.unparse(stmt.value)
        for stmt in module.body
    )
    return module_mark or any("mark.slow" in ast.unparse(d) for d in node.decorator_list)


def _script_runners(module: ast.Module) -> set[str]:
    """Names of the module's non-test functions that run a script (``run_script``,
    ``script_command``), directly or through another such helper."""
    helpers = {n.name: ast.unparse(n) for n in module.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("test_")}
    runners = {"run_script", "script_command"}
    changed = True
    while changed:
        changed = False
        for name, source in helpers.items():
            if name not in runners and any(f"{r}(" in source for r in runners):
                runners.add(name)
                changed = True
    return runners


def test_every_test_that_runs_a_script_is_marked_slow() -> None:
    unmarked = []
    for path in sorted(TESTS.glob("test_*.py")):
        module = ast.parse(path.read_text())
        runners = _script_runners(module)
        for node in module.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                source = ast.unparse(node)
                if any(f"{r}(" in source for r in runners) and not _marked_slow(node, module):
                    unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, f"tests that run scripts in a subprocess without @pytest.mark.slow: {unmarked}"
