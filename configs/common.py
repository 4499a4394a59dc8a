"""Pieces shared by the config files (data only)."""


def shapes_groups(dataset: str, t2i_weight: float = 1.0, **qa_options) -> dict:
  """The shapes demo's two data groups over a TFDS `bagel_shapes` split: captions -> images, and QA."""
  src = dict(format="tfds", name=dataset, split="train", data_dir="", image_key="image")
  return {
      "t2i": dict(src, task="t2i", caption_key="caption", weight=t2i_weight),
      "qa": dict(src, task="qa", qa_key="qa", **qa_options, weight=1.0),
  }
