"""Policy and reference models: the tiny built-in model, loading from a folder or hub name."""
