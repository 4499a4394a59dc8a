"""`python -m bagel_jax.train --config configs/NAME.py [--config.key=value ...] --workdir DIR`.

An absl app over an ml_collections config file (`bagel_jax.train.config.base_config` lists every
key). A config the trainer refuses, and every fault that is the user's to fix, ends the run with
one line `bagel_jax.train: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys

from bagel_jax.train.config import TrainConfigError, check_overrides

PROG = "bagel_jax.train"


def refused_errors() -> tuple[type[BaseException], ...]:
  """The errors that are a user's to fix: reported in one line, no traceback."""
  from bagel_jax.config import ConfigError
  from bagel_jax.data.samples import SampleError
  from bagel_jax.data.sources import DataError
  from bagel_jax.layout import LayoutError
  from bagel_jax.sharding import ShardingError
  from bagel_jax.tokenizer import TokenizerError
  from bagel_jax.train.checkpoints import CheckpointCorrupt, CheckpointMismatch
  from bagel_jax.train.optim import OptimConfigError
  from bagel_jax.weights import CheckpointError
  return (ShardingError, TrainConfigError, ConfigError, DataError, TokenizerError, LayoutError, OptimConfigError,
          SampleError, CheckpointMismatch, CheckpointCorrupt, CheckpointError, FloatingPointError)


def _fail(message: str) -> None:
  print(f"{PROG}: error: {message}", file=sys.stderr)
  sys.exit(2)


def _log_to_stderr() -> None:
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
  root = logging.getLogger("bagel_jax")
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  root.propagate = False
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)


def main(argv=None) -> None:
  if argv is None:  # the command line, not a caller passing its own arguments
    from bagel_jax import host_heap
    host_heap.reexec_with_steady_heap()
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "a config file (configs/NAME.py); override keys with "
                                  "--config.key=value", lock_config=True)
  flags.DEFINE_string("workdir", None, "where checkpoints, logs, metrics and samples go")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    _log_to_stderr()
    from bagel_jax.sharding import initialize_distributed
    from bagel_jax.train.loop import run
    initialize_distributed()
    from bagel_jax import faults
    faults.quiet_background_tracebacks()
    try:
      result = run(flags.FLAGS.config, flags.FLAGS.workdir)
    except refused_errors() as e:
      _fail(str(e))
    except Exception as e:  # noqa: BLE001 - a full disk or a read-only folder is one line; a bug keeps its traceback
      line = faults.describe(e)
      if line is None or faults.show_traceback():
        raise
      _fail(line)
    if "eval" in result:
      print(json.dumps(result["eval"], indent=1))

  def parse(args):
    try:
      check_overrides(args)
      return flags.FLAGS(args)
    except TrainConfigError as e:
      _fail(str(e))
    except flags.Error as e:
      _fail(str(e))
    except (KeyError, AttributeError, ValueError, TypeError) as e:
      _fail(f"bad config override: {str(e).splitlines()[0]}")

  app.run(_main, argv=argv, flags_parser=parse)


if __name__ == "__main__":
  main()
