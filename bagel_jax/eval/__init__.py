"""Evaluation: the shapes demo's held-out evaluator (`shapes.py`)."""
