"""Built-in plugin (filled in by its stage issue)."""
