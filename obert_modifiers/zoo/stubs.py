"""SparseZoo v1 model stubs:
``zoo:DOMAIN/SUB_DOMAIN/ARCH[-SUB_ARCH]/FRAMEWORK/REPO/DATASET[-SCHEME]/SPARSE_TAG``.

The grammar is the one of ``sparsezoo.model.utils.STUB_V1_REGEX_EXPR`` (sparsezoo 1.8.1), written
here without importing sparsezoo (the hub server must start fast). Segment characters are letters,
digits, ``_`` and ``.``; ``-`` separates the optional sub-architecture / training scheme and is
allowed inside the sparse tag (``pruned80_quant-none``). Query parameters (``?recipe=...``) are
split off, not part of the identity.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from obert_modifiers.errors import ObertError

ZOO_PREFIX = "zoo:"
# applied with fullmatch: ``$`` would let a trailing newline through
_SEGMENT = r"[.A-Za-z0-9_]+"
STUB_RE = re.compile(
    rf"(?P<domain>{_SEGMENT})"
    rf"/(?P<sub_domain>{_SEGMENT})"
    rf"/(?P<architecture>{_SEGMENT})(?:-(?P<sub_architecture>{_SEGMENT}))?"
    rf"/(?P<framework>{_SEGMENT})"
    rf"/(?P<repo>{_SEGMENT})"
    rf"/(?P<dataset>{_SEGMENT})(?:-(?P<training_scheme>{_SEGMENT}))?"
    rf"/(?P<sparse_tag>[.A-Za-z0-9_][.A-Za-z0-9_-]*)"
)
EXAMPLE_STUB = "zoo:nlp/text_classification/minilm-l6/pytorch/huggingface/rotten_tomatoes/pruned80_quant-none"


class StubError(ObertError, ValueError):
    """A string that is not a SparseZoo v1 stub."""


@dataclass(frozen=True)
class Stub:
    domain: str
    sub_domain: str
    architecture: str
    sub_architecture: str | None
    framework: str
    repo: str
    dataset: str
    training_scheme: str | None
    sparse_tag: str

    @property
    def path(self) -> str:
        """The stub without ``zoo:``: ``nlp/text_classification/...``."""
        arch = self.architecture + (f"-{self.sub_architecture}" if self.sub_architecture else "")
        data = self.dataset + (f"-{self.training_scheme}" if self.training_scheme else "")
        return "/".join(
            (self.domain, self.sub_domain, arch, self.framework, self.repo, data, self.sparse_tag)
        )

    def __str__(self) -> str:
        return ZOO_PREFIX + self.path

    def fields(self) -> dict[str, str | None]:
        return asdict(self)


def parse_stub(text: str) -> Stub:
    """Parse ``zoo:...`` (the prefix is optional; ``?params`` are dropped) or raise StubError."""
    if not isinstance(text, str):
        raise StubError(f"stub must be a string, got {type(text).__name__}")
    if any(not c.isprintable() for c in text):
        raise StubError(f"invalid stub {text[:200]!r}: it holds a control character")
    raw = text.strip()
    body = raw[len(ZOO_PREFIX) :] if raw.startswith(ZOO_PREFIX) else raw
    body = body.split("?", 1)[0]
    match = STUB_RE.fullmatch(body)
    if not match:
        raise StubError(
            f"invalid stub {text!r}: expected zoo:DOMAIN/SUB_DOMAIN/ARCH[-SUB_ARCH]/FRAMEWORK/REPO/"
            f"DATASET[-SCHEME]/SPARSE_TAG (letters, digits, '_' and '.' in each part), e.g. {EXAMPLE_STUB}"
        )
    return Stub(**match.groupdict())


def stub_query_params(text: str) -> dict[str, str]:
    """The ``?a=b&c=d`` part of a stub as a dict (empty if none)."""
    if "?" not in text:
        return {}
    query = text.split("?", 1)[1]
    params = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        params[key] = value
    return params
