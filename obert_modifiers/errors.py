"""The package's one error base class.

Every error obert-modifiers raises on purpose (a bad recipe key, a folder that breaks the deployment
contract, a hub that answers nonsense) is an :class:`ObertError`. Its message is the whole story:
it names what was wrong and where (recipe key, file, stub) and what would be right, so the ``obert``
command prints it as one line and exits 1, without a traceback. Subclasses keep the built-in base
they had (``ValueError``, ``RuntimeError``...) so ``except ValueError`` in user code still works.

Pure Python: importable from ``algorithms/``, ``zoo/`` and everything else.
"""

from __future__ import annotations


class ObertError(Exception):
    """Base class of every error obert-modifiers raises on purpose."""
