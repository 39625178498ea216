"""The search: YAML spaces, Ray Tune + Optuna, and the evidence that guides them."""
