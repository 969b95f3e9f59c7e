"""Sample broken plugins: one module per way a plugin can fail (see pyproject.toml)."""
