"""The shapes evaluator: generation read back by image analysis, and question answering.

- Generation: for every held-out caption combination (`shapes.HELD_OUT_SINGLE` and
  `HELD_OUT_COUNT`, never seen in training) the model generates `gen_prompts_per_combo` images
  (different noise) with classifier-free guidance: Euler steps of the flow from t = 1 (noise) to
  t = 0 on the packed layout the model was trained on ([caption, noisy VAE image] and, for the
  unconditional branch, [noisy VAE image] alone), v = v_u + s (v_c - v_u), then the VAE decodes.
  `analyse` reads each image back: connected components of bright pixels (ignoring specks under
  20 pixels, a third of the smallest drawn shape) -> count; mean colour ->
  nearest palette colour; shape: a triangle (point up) has less than 0.7 times as many pixels
  above its middle as below; else a square fills 30% of the four corner blocks of its
  bounding box (side/5) or 90% of the box, a circle leaves the corners empty; centroid -> grid
  cell. A generated image is correct when the count, every object's colour and shape, and (for
  one object) its cell match the caption.
- Understanding: every question about the first `und_images` images of the test split (drawn
  with another seed than the train split), answered greedily (at most 3 tokens, stopping at
  <|im_end|>), exact match.

`evaluate_shapes(...)` writes WORKDIR/eval/{metrics.json, samples.png, samples.json} and returns
the metrics: gen_accuracy (all attributes right), per-attribute accuracies, und_accuracy, and
the analyser's accuracy on real rendered images (a sanity check of the read-back).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from bagel_jax import layout as L
from bagel_jax.data import shapes
from bagel_jax.image import patchify, unpatchify
from bagel_jax.model.bagel import Batch, shift_timesteps

PALETTE = {k: np.asarray(v, np.float32) for k, v in shapes.COLOURS.items()}


# ----------------------------------------------------------------------------- image analysis
def analyse(img: np.ndarray, min_area: int = 20) -> list[dict]:
  """uint8 [H, W, 3] on black -> objects [{colour, shape, cell, area}] (see the module docstring)."""
  from scipy import ndimage
  img = np.asarray(img).astype(np.float32)
  h, w = img.shape[:2]
  fg = img.max(axis=-1) > 100.0
  labels, n = ndimage.label(fg)
  out = []
  for i in range(1, n + 1):
    mask = labels == i
    area = int(mask.sum())
    if area < min_area:
      continue
    ys, xs = np.nonzero(mask)
    bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    fill = area / float(bw * bh)
    mid = (ys.min() + ys.max()) / 2.0
    top, bottom = int(np.sum(ys < mid)), int(np.sum(ys > mid))
    balance = top / max(bottom, 1)  # an upward triangle has much less mass in its upper half
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    k = max(1, min(bw, bh) // 5)  # corner blocks of the bounding box: full for a square, empty for a circle
    corners = float(np.mean([box[:k, :k].mean(), box[:k, -k:].mean(), box[-k:, :k].mean(), box[-k:, -k:].mean()]))
    if balance < 0.7:
      shape = "triangle"
    elif corners >= 0.3 or fill >= 0.9:
      shape = "square"
    else:
      shape = "circle"
    mean = img[mask].mean(axis=0)
    colour = min(PALETTE, key=lambda k: float(np.sum((PALETTE[k] - mean) ** 2)))
    cy, cx = ys.mean(), xs.mean()
    cell = int(cy >= h / 2) * 2 + int(cx >= w / 2)
    out.append({"colour": colour, "shape": shape, "cell": cell, "area": area, "fill": round(fill, 3),
                "balance": round(balance, 3), "corners": round(corners, 3)})
  return out


def judge(objects: list[dict], scene: shapes.Scene) -> dict[str, bool]:
  """Per-attribute correctness of the read-back objects against the scene the caption describes."""
  count = len(objects) == scene.count
  colour = bool(objects) and all(o["colour"] == scene.colour for o in objects)
  shape = bool(objects) and all(o["shape"] == scene.shape for o in objects)
  res = {"count": count, "colour": colour, "shape": shape}
  if scene.count == 1:
    res["position"] = count and objects[0]["cell"] == scene.cells[0]
  res["all"] = all(res.values())
  return res


# ----------------------------------------------------------------------------- generation
def _pack(model, plans: Sequence[list], capacity: L.Capacity):
  cfg = model.cfg
  return L.pack([[p] for p in plans], capacity, cfg.tokens, **L.position_args(cfg))


def generate(model, params, tokenizer, captions: Sequence[str], grid: tuple[int, int], *, cfg_scale: float,
             num_steps: int, timestep_shift: float, rng: jax.Array, batch: int = 64) -> np.ndarray:
  """Captions -> uint8 images [N, H, W, 3] (Euler flow sampling with text CFG)."""
  cfg = model.cfg
  gh, gw = grid
  nl = gh * gw
  pdim = cfg.patch_latent_dim
  ids = [tokenizer.encode(c) for c in captions]
  longest = max(len(i) for i in ids) + 2 + nl + 2
  cap = L.Capacity(tokens=longest, vit=1, vae=nl, ce=1, vae_images=1, gen=nl)

  @jax.jit
  def velocity(p, layout, x, t):
    tt = jnp.where(layout.vae_image_ids >= 0, t[:, None], 0.0)
    b = Batch(layout=layout, vit_patches=jnp.zeros((x.shape[0], 1, cfg.vit.patch_dim), jnp.float32),
              vae_latents=x, noise=x, timesteps=tt)  # (1 - t) x + t x = x: the model sees x_t as is
    return model.forward(p, b).velocity

  @jax.jit
  def decode(p, tokens):
    lat = unpatchify(tokens, gh, gw, cfg.latent_patch_size)
    return model.decode_latents(p, lat)

  ts = shift_timesteps(np.linspace(1.0, 0.0, num_steps + 1), timestep_shift)
  out = []
  for s in range(0, len(captions), batch):
    chunk = ids[s:s + batch]
    n = len(chunk)
    pad = batch - n  # fixed shapes: one compile
    plans = [[L.Text(i), L.VaeImage(grid, loss=True)] for i in chunk] + [[L.Text(chunk[0]), L.VaeImage(grid, loss=True)]] * pad
    plans += [[L.VaeImage(grid, loss=True)]] * batch
    lay = jax.tree.map(jnp.asarray, _pack(model, plans, cap))
    rng, k = jax.random.split(rng)
    x = jax.random.normal(k, (batch, nl, pdim), jnp.float32)
    for i in range(num_steps):
      t = jnp.full((2 * batch,), ts[i], jnp.float32)
      v = velocity(params, lay, jnp.concatenate([x, x]), t)
      v_c, v_u = v[:batch], v[batch:]
      v = v_u + cfg_scale * (v_c - v_u)
      x = x + (ts[i + 1] - ts[i]) * v
    img = np.asarray(decode(params, x))[:n]
    out.append(np.clip((img + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8))
  return np.concatenate(out)


# ----------------------------------------------------------------------------- understanding
def answer(model, params, tokenizer, images: np.ndarray, questions: Sequence[str], vit_transform,
           max_tokens: int = 3, batch: int = 64) -> list[str]:
  """Greedy answers (at most max_tokens, stopping at <|im_end|>) to one question per image."""
  cfg = model.cfg
  eos = cfg.tokens.eos_token_id
  p = cfg.vit.patch_size
  vit_imgs = [vit_transform(Image.fromarray(im)) for im in images]
  grid = (vit_imgs[0].shape[0] // p, vit_imgs[0].shape[1] // p)
  nv = grid[0] * grid[1]
  q_ids = [tokenizer.encode(q) for q in questions]
  longest = nv + 2 + max(len(q) for q in q_ids) + 2 + max_tokens + 2
  cap = L.Capacity(tokens=longest, vit=nv, vae=1, gen=1, ce=max_tokens + 1, vae_images=1)

  @jax.jit
  def logits(prm, layout, patches):
    b = patches.shape[0]
    batch_ = Batch(layout=layout, vit_patches=patches, vae_latents=jnp.zeros((b, 1, cfg.patch_latent_dim)),
                   noise=jnp.zeros((b, 1, cfg.patch_latent_dim)), timesteps=jnp.zeros((b, 1)))
    return model.forward(prm, batch_).ce_logits

  answers = []
  for s in range(0, len(images), batch):
    idx = list(range(s, min(s + batch, len(images))))
    idx += [idx[0]] * (batch - len(idx))
    patches = jnp.asarray(np.stack([patchify(vit_imgs[i], p) for i in idx]))
    prefix = [[] for _ in idx]
    done = [False] * len(idx)
    for step in range(max_tokens):
      plans = [[L.VitImage(grid), L.Text(q_ids[i]), L.Text(prefix[j], loss=True)] for j, i in enumerate(idx)]
      lay = jax.tree.map(jnp.asarray, _pack(model, plans, cap))
      lg = np.asarray(logits(params, lay, patches))
      for j in range(len(idx)):
        if done[j]:
          continue
        tok = int(np.argmax(lg[j, len(prefix[j]), :tokenizer.vocab_size + 4]))
        if tok == eos or tok >= tokenizer.vocab_size:
          done[j] = True
        else:
          prefix[j].append(tok)
    answers.extend(tokenizer.decode(pr) for pr in prefix[:min(batch, len(images) - s)])
  return answers


# ----------------------------------------------------------------------------- the whole evaluation
def _grid_png(images: np.ndarray, path: pathlib.Path, cols: int, scale: int = 4) -> None:
  n, h, w, _ = images.shape
  rows = -(-n // cols)
  canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
  for i, im in enumerate(images):
    r, c = divmod(i, cols)
    canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = im
  Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def evaluate_shapes(model, params, tokenizer, config, workdir) -> dict[str, Any]:
  from bagel_jax.data import pipeline
  from bagel_jax.data.sources import tfds_source
  from bagel_jax.data.transforms import decode_image

  ev = config.eval
  out_dir = pathlib.Path(workdir) / "eval"
  out_dir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  cfg = model.cfg
  groups = {n: dict(g) for n, g in config.data.groups.items()}
  qa_name = next(n for n, g in groups.items() if g.get("task") == "qa")
  g = groups[qa_name]
  _, vit_t = pipeline.transforms_for(config.data, g, cfg)
  size = int(config.data.vae_max_size)
  grid = (size // cfg.latent_downsample, size // cfg.latent_downsample)

  # Generation on held-out caption combinations.
  scenes = [shapes.scene_from_prompt_key(k) for k in shapes.HELD_OUT_SINGLE + shapes.HELD_OUT_COUNT]
  scenes = [s for s in scenes for _ in range(int(ev.gen_prompts_per_combo))]
  captions = [s.caption() for s in scenes]
  imgs = generate(model, params, tokenizer, captions, grid, cfg_scale=float(ev.cfg_scale),
                  num_steps=int(ev.num_steps), timestep_shift=float(ev.timestep_shift),
                  rng=jax.random.key(int(ev.seed)))
  verdicts, read = [], []
  for im, sc in zip(imgs, scenes):
    objs = analyse(im)
    read.append(objs)
    verdicts.append(judge(objs, sc))
  gen = {f"gen_{k}_accuracy": float(np.mean([v[k] for v in verdicts if k in v]))
         for k in ("all", "count", "colour", "shape", "position")}
  gen["gen_accuracy"] = gen.pop("gen_all_accuracy")
  _grid_png(imgs, out_dir / "samples.png", cols=int(ev.gen_prompts_per_combo) * 3)
  (out_dir / "samples.json").write_text(json.dumps(
      [{"caption": c, "read_back": r, "correct": v} for c, r, v in zip(captions, read, verdicts)], indent=1))

  # Understanding on test-split images.
  src = tfds_source(g.get("name"), ev.split, g.get("data_dir") or None, build=True)
  n_img = min(int(ev.und_images), len(src))
  recs = [src[i] for i in range(n_img)]
  images = np.stack([np.asarray(decode_image(bytes(r["image"]))) for r in recs])
  sanity = []
  qs, truth, img_idx = [], [], []
  for i, r in enumerate(recs):
    obj = json.loads(r["objects"])
    scene = shapes.Scene(obj["colour"], obj["shape"], tuple(obj["cells"]))
    sanity.append(judge(analyse(images[i]), scene)["all"])
    for q, a in json.loads(r["qa"]):
      qs.append(q); truth.append(a); img_idx.append(i)
  preds = answer(model, params, tokenizer, images[img_idx], qs, vit_t)
  correct = [p == t for p, t in zip(preds, truth)]
  by_q = {}
  for q, c in zip(qs, correct):
    by_q.setdefault(q, []).append(c)
  und = {"und_accuracy": float(np.mean(correct)),
         **{f"und_{k}_accuracy": float(np.mean(by_q[v])) for k, v in shapes.QUESTIONS.items() if v in by_q}}
  metrics = {**gen, **und, "gen_images": len(captions), "und_questions": len(qs),
             "analyser_accuracy_on_real_images": float(np.mean(sanity)), "eval_seconds": round(time.time() - t0, 1)}
  (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
  try:
    from tensorboardX import SummaryWriter
    w = SummaryWriter(str(pathlib.Path(workdir) / "tb"))
    step = int(config.train.steps)
    for k, v in metrics.items():
      w.add_scalar(f"eval/{k}", v, step)
    w.add_image("eval/samples", np.asarray(Image.open(out_dir / "samples.png")), step, dataformats="HWC")
    w.close()
  except Exception:  # noqa: BLE001
    pass
  return metrics
