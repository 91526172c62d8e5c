"""`evaluate(EvalConfig)`: zoo -> data -> features -> evaluators -> results; what a notebook or the CLI calls."""
