"""Domain types: no I/O, no framework (the import contract says so)."""
