"""The append-only results store and the typed record accessors every reader shares."""
