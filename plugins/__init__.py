"""trtkit's built-in plugins. Each module here is named by an entry point in the `trtkit` group of the root
pyproject.toml and is loaded exactly like a third-party plugin."""
