"""The one error of weight I/O: a missing, truncated or mismatched checkpoint, named in one line."""


class CheckpointError(ValueError):
  """A checkpoint file or folder that cannot be read as asked (names the file, key and shape)."""
