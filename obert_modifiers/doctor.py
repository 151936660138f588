"""``python -m obert_modifiers.doctor``: check that the pinned stack, the start-up hook and the
bundled model/data packages are all in place. Exits non-zero and says what is missing."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import site
import subprocess
import sys
from pathlib import Path

from obert_modifiers.version import __version__

EXPECTED = {
    "torch": "2.13.0",
    "sparseml": "1.8.0",
    "sparsezoo": "1.8.1",
    "transformers": "4.40.2",
    "datasets": "2.18.0",
    "accelerate": "0.28.0",
    "onnx": "1.14.1",
    "numpy": "1.26.4",
}


def _hook_file() -> Path | None:
    for directory in [*site.getsitepackages(), site.getusersitepackages()]:
        candidate = Path(directory) / "obert_modifiers_hook.pth"
        if candidate.exists():
            return candidate
    return None


def check() -> list[str]:
    problems: list[str] = []
    for name, wanted in EXPECTED.items():
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed (want {wanted}; see constraints.txt)")
            continue
        if found.split("+")[0] != wanted:
            problems.append(f"{name} {found} is installed, constraints.txt pins {wanted}")
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        problems.append("pkg_resources is missing (setuptools>=81?): SparseML 1.8 imports it")
    if _hook_file() is None:
        problems.append("obert_modifiers_hook.pth is not in site-packages: reinstall the package")
    # The hook must stay lazy: a bare interpreter must not import torch or SparseML.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; print('torch' in sys.modules or 'sparseml' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    if probe.stdout.strip() != "False":
        problems.append(
            f"a bare interpreter imports torch/SparseML at start-up: {probe.stdout}{probe.stderr}"
        )
    from obert_modifiers import resources

    problems.extend(resources.missing_packages())
    return problems


def main() -> int:
    problems = check()
    if problems:
        print("obert-modifiers doctor found problems:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"obert-modifiers {__version__}: stack, start-up hook and bundled data are in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
