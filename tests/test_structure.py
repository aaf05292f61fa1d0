"""Imports flow one way: cli -> tasks (finetune, predict, report) -> methods / data -> parts."""

import ast
from pathlib import Path

import fetalssl

PACKAGE = Path(fetalssl.__file__).parent
# Who may not import whom: layer -> packages it must never reach into.
FORBIDDEN = {
    "data": ("fetalssl.cli", "fetalssl.finetune", "fetalssl.report", "fetalssl.predict", "fetalssl.methods"),
    "models": ("fetalssl.cli", "fetalssl.finetune", "fetalssl.report", "fetalssl.predict", "fetalssl.methods",
               "fetalssl.data"),
    "methods": ("fetalssl.cli", "fetalssl.finetune", "fetalssl.report", "fetalssl.predict"),
    "finetune": ("fetalssl.cli", "fetalssl.report", "fetalssl.predict"),
    "report": ("fetalssl.cli", "fetalssl.finetune", "fetalssl.predict"),
    "predict": ("fetalssl.cli", "fetalssl.report"),
    "demo": ("fetalssl.cli", "fetalssl.finetune", "fetalssl.report", "fetalssl.predict", "fetalssl.methods"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_library_module_imports_cli_and_layers_import_downwards_only():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        layer = parts[0] if len(parts) > 1 else path.stem
        banned = FORBIDDEN.get(layer, () if layer == "cli" else ("fetalssl.cli",))
        for module in imported_modules(path):
            if module.startswith(banned):
                offences.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not offences, offences
