"""dpfeta: differentially private image synthesis (DP-FETA) on Ray."""

__version__ = "0.1.0"


def library_versions(*dists: str) -> dict[str, str | None]:
    """The installed versions of the libraries a result depends on (None: not installed), read from
    their metadata without importing them (``dpfeta --version``, a run's MLflow tags)."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions
