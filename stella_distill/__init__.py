"""stella-distill: distil text-embedding teachers into small students (Jasper/Stella recipe)."""

from __future__ import annotations

from stella_distill.version import __version__


def load(path: str, dim: int | None = None, **kwargs):
    """Load an exported model as a ``SentenceTransformer``, optionally at another offered ``dim``."""
    from stella_distill.layout import load as _load

    return _load(path, dim=dim, **kwargs)


__all__ = ["load", "__version__"]
