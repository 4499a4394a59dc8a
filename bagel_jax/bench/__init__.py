"""Benchmarks: `python -m bagel_jax.bench NAME [args]`, one module per NAME with a `main(argv)`."""
