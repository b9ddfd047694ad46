"""embtune: fine-tune text-embedding models for retrieval and similarity."""

__version__ = "0.1.0"


def load(name_or_path: str, device: str | None = None, truncate_dim: int | None = None):
    """Load a saved embtune model or any local/hub encoder; see :func:`embtune.model.load`.
    ``truncate_dim``: Matryoshka embeddings of that many dims (first dims, re-normalised)."""
    from embtune.model import load as _load

    return _load(name_or_path, device, truncate_dim)
