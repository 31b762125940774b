"""Project imports stand at module top, so the import graph is the real one (issue 18).

A function-local import of a project module (``vlp_core.*``, ``flows.*`` or a relative one)
hides an arrow from ``farm-studio look`` and from the reader.  Function-local imports stay
only for heavy third-party packages (torch, transformers, timm, img2dataset, duckdb, ...: not
checked here) and for the places listed in :data:`ALLOWED`, each with its reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vlp_core", "flows")

# (file, imported module) pairs allowed inside a function, or (file, "*") for every import of a file
ALLOWED = {
    # the CLI's lazy command loading: `vlp --help` registers every sub-command without loading
    # the stage code (and its torch / transformers / img2dataset) that a command runs
    **{(str(p.relative_to(ROOT)), "*"): "lazy command loading" for pkg in PACKAGES
       for p in (ROOT / pkg).rglob("*commands.py")},
}


def _project_module(node: ast.ImportFrom | ast.Import) -> list[str]:
    """The project modules ``node`` imports (empty for a third-party or stdlib import)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif node.level:  # relative: always the project's
        return [f"{'.' * node.level}{node.module or ''}"]
    else:
        names = [node.module or ""]
    return [n for n in names if n.split(".")[0] in PACKAGES]


def local_imports(tree: ast.AST) -> set[tuple[int, str]]:
    """``(line, module)`` of every project import inside a function (or method) of ``tree``."""
    found = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found |= {(node.lineno, mod) for mod in _project_module(node)}
    return found


def function_local_imports() -> list[tuple[str, int, str]]:
    """``(file, line, module)`` of every project import inside a function of vlp_core/ and flows/."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            found += [(str(path.relative_to(ROOT)), line, mod) for line, mod in local_imports(tree)]
    return sorted(found)


def test_no_function_local_project_imports_outside_the_allow_list():
    found = function_local_imports()
    bad = [f"{f}:{line}: {mod}" for f, line, mod in found if (f, "*") not in ALLOWED and (f, mod) not in ALLOWED]
    assert not bad, "function-local project imports (move them to module top, or fix the layering):\n" + "\n".join(bad)
    # the allow-list holds only what is still needed (a stale entry would hide a new import)
    used = {(f, "*") for f, _, _ in found} | {(f, mod) for f, _, mod in found}
    stale = [k for k in ALLOWED if k[1] != "*" and k not in used]
    assert not stale, f"allow-list entries no longer needed: {stale}"


def test_the_check_sees_a_function_local_import():
    """The parser finds imports nested in functions, methods and inner functions, and only those."""
    src = ("from vlp_core.io import write_json\n"
           "def f():\n    from vlp_core.schema import C\n"
           "class K:\n    def m(self):\n        def inner():\n            import flows.tasks\n"
           "def g():\n    import torch\n")
    assert sorted(local_imports(ast.parse(src))) == [(3, "vlp_core.schema"), (7, "flows.tasks")]
