"""The package version (read by pyproject.toml and written into every MoLE file's manifest)."""

__version__ = "0.1.0"
