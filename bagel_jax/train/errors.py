"""The trainer's own error: a config it refuses before building anything (one line, exit code 2)."""


class TrainConfigError(ValueError):
  """A config the trainer refuses before building anything."""
