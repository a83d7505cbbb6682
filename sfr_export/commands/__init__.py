"""CLI command groups, one module per pipeline area; each exposes ``register(app)``."""
