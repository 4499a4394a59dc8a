"""Errors raised for bad inference requests (one line, naming the culprit and the limit)."""


class InferenceError(ValueError):
  """A request the model cannot serve: a size beyond its tables, a bad setting, a missing file."""
