"""The `patchbench` command: one module per command group, and `common` for consoles, progress and option types."""
