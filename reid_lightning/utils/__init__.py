"""Small utilities shared across the package (process-group helpers in ``comm``)."""
