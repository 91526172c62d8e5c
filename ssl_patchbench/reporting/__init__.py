"""The paper's tables and their rendering (they only read results), and the CI gate (`check`, which evaluates)."""
