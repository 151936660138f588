"""The layering rules of docs/architecture.md, checked on the source (an AST walk, no imports run).

Every import counts, also one inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "obert_modifiers"

# (rule name, which modules of the package it covers, forbidden import prefixes, why)
RULES = [
    ("algorithms-no-sparseml", "obert_modifiers.algorithms", ("sparseml",), "algorithms/ is pure torch"),
    ("params-no-framework", "obert_modifiers.params", ("sparseml", "torch"), "any adapter builds from it"),
    ("native-no-sparseml", "obert_modifiers.native", ("sparseml",), "the modern venv has no SparseML"),
    (
        "native-recipe-light",
        "obert_modifiers.native.recipe",
        ("sparseml", "torch", "transformers"),
        "obert recipe check runs in the light install",
    ),
    ("zoo-no-torch", "obert_modifiers.zoo", ("torch", "transformers"), "the hub runs without torch"),
    ("export-no-zoo", "obert_modifiers.export", ("obert_modifiers.zoo",), "export runs without [hub]"),
    ("bench-no-zoo", "obert_modifiers.bench", ("obert_modifiers.zoo",), "bench runs without [hub]"),
    (
        "deployment-contract-light",
        "obert_modifiers.deployment",
        ("torch", "transformers", "sparseml", "obert_modifiers.zoo", "obert_modifiers.export"),
        "export and the hub both read the contract",
    ),
    ("errors-pure", "obert_modifiers.errors", ("torch", "sparseml", "obert_modifiers."), "anywhere"),
    ("hook-is-mechanism", "obert_modifiers._hook", ("obert_modifiers", "sparseml", "torch"), "start-up"),
    ("package-not-scripts", "obert_modifiers", ("benchmarks", "tests", "conftest", "_helpers"), "one way"),
]


def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, root: Path = PACKAGE_DIR) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from obert_modifiers import zoo` imports obert_modifiers.zoo
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def violations(covered: str, forbidden: tuple[str, ...], root: Path = PACKAGE_DIR) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        if name != covered and not name.startswith(covered + "."):
            continue
        for line, target in imported_names(path, root):
            for prefix in forbidden:
                hit = target.startswith(prefix) if prefix.endswith(".") else (
                    target == prefix or target.startswith(prefix + ".")
                )
                if hit and not (target == covered or target.startswith(covered + ".")):
                    found.append(f"{path.relative_to(root.parent)}:{line} imports {target}")
    return found


@pytest.mark.parametrize("rule", RULES, ids=[rule[0] for rule in RULES])
def test_layering_rule_holds(rule):
    name, covered, forbidden, why = rule
    relative = Path(*covered.split(".")[1:])
    assert (PACKAGE_DIR / relative).is_dir() or (PACKAGE_DIR / relative).with_suffix(".py").is_file(), (
        f"rule {name}: {covered} does not exist; update RULES and docs/architecture.md"
    )
    assert violations(covered, forbidden) == [], f"rule {name} ({why}) is broken"


def test_the_checker_catches_a_forbidden_import(tmp_path):
    """Each kind of forbidden import a rule names is reported: plain, from-, relative, inside a function."""
    root = tmp_path / "obert_modifiers"
    (root / "zoo").mkdir(parents=True)
    (root / "export").mkdir()
    (root / "algorithms").mkdir()
    for package in (root, root / "zoo", root / "export", root / "algorithms"):
        (package / "__init__.py").write_text("")
    (root / "zoo" / "bad.py").write_text("def f():\n    import torch.nn\n")
    (root / "export" / "bad.py").write_text("from ..zoo import client\n")
    (root / "export" / "worse.py").write_text("from obert_modifiers import zoo\n")
    (root / "algorithms" / "bad.py").write_text("from sparseml.pytorch import utils\n")
    (root / "algorithms" / "fine.py").write_text("import torch\nfrom . import bad\n")
    (root / "scripts.py").write_text("import benchmarks._pipeline\n")

    assert violations("obert_modifiers.zoo", ("torch",), root) == [
        "obert_modifiers/zoo/bad.py:2 imports torch.nn"
    ]
    assert violations("obert_modifiers.export", ("obert_modifiers.zoo",), root) == [
        "obert_modifiers/export/bad.py:1 imports obert_modifiers.zoo",
        "obert_modifiers/export/bad.py:1 imports obert_modifiers.zoo.client",
        "obert_modifiers/export/worse.py:1 imports obert_modifiers.zoo",
    ]
    assert violations("obert_modifiers.algorithms", ("sparseml",), root) == [
        "obert_modifiers/algorithms/bad.py:1 imports sparseml.pytorch",
        "obert_modifiers/algorithms/bad.py:1 imports sparseml.pytorch.utils",
    ]
    assert violations("obert_modifiers", ("benchmarks",), root) == [
        "obert_modifiers/scripts.py:1 imports benchmarks._pipeline"
    ]
