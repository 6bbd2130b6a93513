"""Layers point one way: nothing below the shells imports them, and nothing imports the CLI."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "operator" / "testlooper"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_outside_the_cli_imports_it():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "cli" or relative.name == "__main__.py":
            continue
        for name in imported_modules(path):
            if name == "testlooper.cli" or name.startswith("testlooper.cli."):
                offenders.append(f"{relative} imports {name}")
    assert not offenders, offenders


def test_the_kube_and_ec2_adapters_import_no_shell():
    shells = ("testlooper.cluster", "testlooper.local", "testlooper.cli")
    offenders = []
    for path in [*(PACKAGE / "kube").rglob("*.py"), *(PACKAGE / "ec2").rglob("*.py")]:
        for name in imported_modules(path):
            if any(name == shell or name.startswith(shell + ".") for shell in shells):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, offenders
