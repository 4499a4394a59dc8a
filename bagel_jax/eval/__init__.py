"""Evaluation: the shapes demo's held-out evaluator (`shapes.py`) and the benchmark runners in the
official formats of upstream's evaluations (`python -m bagel_jax.eval BENCH`, see `__main__.py`)."""
