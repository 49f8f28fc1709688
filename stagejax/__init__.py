"""stagejax: spermatogenic stage prediction for mouse seminiferous tubules."""

__version__ = "0.1.0"
