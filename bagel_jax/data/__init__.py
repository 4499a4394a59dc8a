"""Training data: upstream's record formats and TFDS/ArrayRecord datasets -> grain -> packed batches."""
