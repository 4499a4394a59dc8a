"""The Gradio page: upstream app.py's three tabs, with its controls and defaults, over one `Service`.

Deliberate differences: the renorm choices are the sampler's (upstream lists "local", which its
sampler refuses with NotImplementedError); the image ratio's longer side is the model's largest
(1024 for the release); the understanding tab shows the thinking in its own box too; a bad input
is a message in the page; generation shows a denoising progress bar; the tab names carry no
emoji.  Element ids (`t2i-prompt`, `t2i-generate`, `t2i-image`, `und-input`, ...) are stable for
browser tests.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import gradio as gr

from bagel_jax.app import service as svc
from bagel_jax.inference.flow import RENORM_TYPES

# Small models make small images: show them scaled up, pixels kept sharp.
CSS = ".output-image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"
GEN_NAMES = ["think", "seed", "cfg_text_scale", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min",
             "num_timesteps", "timestep_shift", "do_sample", "max_think_token_n", "text_temperature"]


def image_upload(**kw: Any) -> gr.Image:
  """gr.Image whose unreadable uploads become one message in the page (not a processing trace).

  (The instance's preprocess is wrapped: a gr.Image subclass would make gradio write a .pyi here.)"""
  image = gr.Image(**kw)
  plain = image.preprocess

  def preprocess(payload):
    try:
      return plain(payload)
    except gr.Error:
      raise
    except Exception as e:  # PIL: UnidentifiedImageError, DecompressionBombError, truncated files, ...
      raise gr.Error(f"{image.label}: not a readable image file ({type(e).__name__})", print_exception=False) from None

  image.preprocess = preprocess
  return image


@contextlib.contextmanager
def page_errors():
  """A user's mistake, or a setting the model refuses, becomes one message in the page."""
  from bagel_jax.config import ConfigError
  from bagel_jax.inference.errors import InferenceError
  from bagel_jax.tokenizer import TokenizerError
  try:
    yield
  except (InferenceError, ConfigError, TokenizerError) as e:
    raise gr.Error(str(e), print_exception=False) from None


def reporter(progress: gr.Progress):
  """The sampler's per-step callback (on XLA's callback thread) -> this request's progress bar."""
  ctx = contextvars.copy_context()  # gradio finds the request through context variables

  def report(done: int, total: int) -> None:
    ctx.run(progress, (done, total), desc="denoising", unit="steps")
  return report


def step_cache_controls() -> dict[str, Any]:
  """TaylorSeer step caching (upstream PR #232; off by default) in the generation tabs.

  {Inferencer keyword: gradio component}: each is shown in the hyperparameter accordion and its
  value reaches `Inferencer.interleave_inference` as that keyword (upstream's names and defaults).
  """
  return {
      "enable_taylorseer": gr.Checkbox(label="TaylorSeer step caching", value=False,
                                       info="Full forwards on some steps, Taylor forecasts on the others"),
      "fresh_threshold": gr.Number(value=3, precision=0, minimum=1, label="TaylorSeer refresh interval",
                                   info="A full forward every this many calls (upstream fresh_threshold)"),
      "max_order": gr.Number(value=6, precision=0, minimum=0, label="TaylorSeer max order",
                             info="Highest Taylor order of the forecast"),
      "first_enhance": gr.Number(value=5, precision=0, minimum=0, label="TaylorSeer first full steps",
                                 info="The first calls that always run fully (upstream first_enhance)"),
  }


def _slider(lo: float, hi: float, value: float, step: float, label: str, info: str):
  return gr.Slider(minimum=lo, maximum=hi, value=value, step=step, interactive=True, label=label, info=info)


def _renorm_and_steps(d: svc.GenSettings, max_shift: float) -> list:
  with gr.Row():
    kind = gr.Dropdown(choices=list(RENORM_TYPES), value=d.cfg_renorm_type, label="CFG Renorm Type",
                       info="If the generated image is blurry, use 'global'")
    low = _slider(0.0, 1.0, d.cfg_renorm_min, 0.1, "CFG Renorm Min", "1.0 disables CFG-Renorm")
  with gr.Row():
    steps = _slider(10, 100, d.num_timesteps, 5, "Timesteps", "Total denoising steps")
    shift = _slider(1.0, max_shift, d.timestep_shift, 0.5, "Timestep Shift", "Higher values for layout, lower for details")
  return [kind, low, steps, shift]


def _thinking_params(d: svc.GenSettings):
  group = gr.Group(visible=False)
  with group:
    with gr.Row():
      sample = gr.Checkbox(label="Sampling", value=d.do_sample, info="Enable sampling for text generation")
      tokens = _slider(64, 4006, d.max_think_token_n, 64, "Max Think Tokens", "Maximum number of tokens for thinking")
      temp = _slider(0.1, 1.0, d.text_temperature, 0.1, "Temperature", "Controls randomness in text generation")
  return group, [sample, tokens, temp]


def _seed(value: int):
  return gr.Slider(minimum=0, maximum=1000000, value=value, step=1, interactive=True, label="Seed",
                   info="0 for random seed, positive for reproducible results")


def _cfg_text(d: svc.GenSettings, info: str):
  return _slider(1.0, 8.0, d.cfg_text_scale, 0.1, "CFG Text Scale", info)


def _cfg_interval(d: svc.GenSettings):
  return _slider(0.0, 1.0, d.cfg_interval, 0.1, "CFG Interval", "Start of CFG application interval (end is fixed at 1.0)")


def _thinking_toggle(checkbox, *targets) -> None:
  checkbox.change(lambda on: [gr.update(visible=on)] * len(targets), inputs=[checkbox], outputs=list(targets),
                  api_visibility="private")


def _output_image(label: str, elem_id: str):
  return gr.Image(label=label, type="pil", format="png", height=320, elem_id=elem_id, elem_classes=["output-image"],
                  interactive=False)


def _generation_runner(d: svc.GenSettings, names: list[str], cache: dict, call):
  """The click handler: the controls' values -> GenSettings + step-cache keywords -> `call`."""
  n = len(names)

  def run(head, prompt, *values, progress=gr.Progress()):  # head: the ratio or the input image
    settings = d.replace(**dict(zip(names, values[:n])))
    with page_errors():
      return call(head, prompt, settings, reporter(progress), dict(zip(cache, values[n:])))
  return run


def text_to_image_tab(service: svc.Service) -> None:
  d = svc.T2I
  prompt = gr.Textbox(label="Prompt", value=service.prompts.get("t2i", ""), elem_id="t2i-prompt")
  with gr.Row():
    think = gr.Checkbox(label="Thinking", value=d.think, elem_id="t2i-think")
  with gr.Accordion("Inference Hyperparameters", open=False):
    with gr.Group():
      with gr.Row():
        seed = _seed(d.seed)
        ratio = gr.Dropdown(choices=list(svc.RATIOS), value="1:1", label="Image Ratio",
                            info=f"The longer side is fixed to {service.long_side}")
      with gr.Row():
        text_scale = _cfg_text(d, "Controls how strongly the model follows the text prompt (4.0-8.0)")
        interval = _cfg_interval(d)
      rest = _renorm_and_steps(d, 5.0)
      params, thinking_inputs = _thinking_params(d)
      cache = step_cache_controls()
  thinking = _thinking_box("t2i")
  image = _output_image("Generated Image", "t2i-image")
  button = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
  _thinking_toggle(think, thinking, params)

  def call(ratio, prompt, settings, progress, extra):
    return service.text_to_image(prompt, settings, image_ratio=ratio, progress=progress, extra=extra)

  run = _generation_runner(d, GEN_NAMES, cache, call)
  inputs = [ratio, prompt, think, seed, text_scale, interval, *rest, *thinking_inputs, *cache.values()]
  gr.on(triggers=[button.click, prompt.submit], fn=run, inputs=inputs, outputs=[image, thinking], api_name="text_to_image")


def _image_task(tab: str, service: svc.Service, outputs):
  """Upstream's layout of the edit and understanding tabs: input image and prompt | `outputs()`; Thinking.

  outputs: makes the right column's components (the thinking box among them, created in its place)."""
  with gr.Row():
    with gr.Column(scale=1):
      source = image_upload(label="Input Image", type="filepath", sources=["upload", "clipboard"], elem_id=f"{tab}-input")
      prompt = gr.Textbox(label="Prompt", value=service.prompts.get(tab, ""), elem_id=f"{tab}-prompt")
    with gr.Column(scale=1):
      made = outputs()
  with gr.Row():
    think = gr.Checkbox(label="Thinking", value=False, elem_id=f"{tab}-think")
  return source, prompt, made, think


def _thinking_box(tab: str):
  return gr.Textbox(label="Thinking Process", visible=False, elem_id=f"{tab}-thinking")


def edit_tab(service: svc.Service) -> None:
  d = svc.EDIT
  source, prompt, (result, thinking), think = _image_task(
      "edit", service, lambda: (_output_image("Result", "edit-image"), _thinking_box("edit")))
  with gr.Accordion("Inference Hyperparameters", open=False):
    with gr.Group():
      with gr.Row():
        seed = _seed(d.seed)
        text_scale = _cfg_text(d, "Controls how strongly the model follows the text prompt")
      with gr.Row():
        img_scale = _slider(1.0, 4.0, d.cfg_img_scale, 0.1, "CFG Image Scale",
                            "Controls how much the model preserves input image details")
        interval = _cfg_interval(d)
      rest = _renorm_and_steps(d, 10.0)
      params, thinking_inputs = _thinking_params(d)
      cache = step_cache_controls()
  button = gr.Button("Submit", variant="primary", elem_id="edit-submit")
  _thinking_toggle(think, thinking, params)

  def call(image, prompt, settings, progress, extra):
    return service.edit_image(image, prompt, settings, progress=progress, extra=extra)

  run = _generation_runner(d, GEN_NAMES + ["cfg_img_scale"], cache, call)
  inputs = [source, prompt, think, seed, text_scale, interval, *rest, *thinking_inputs, img_scale, *cache.values()]
  gr.on(triggers=[button.click, prompt.submit], fn=run, inputs=inputs, outputs=[result, thinking], api_name="edit_image")


def understanding_tab(service: svc.Service) -> None:
  d = svc.UND
  source, prompt, (thinking, answer), think = _image_task(
      "und", service, lambda: (_thinking_box("und"), gr.Textbox(label="Result", lines=20, elem_id="und-answer")))
  with gr.Accordion("Inference Hyperparameters", open=False):
    with gr.Row():
      sample = gr.Checkbox(label="Sampling", value=d.do_sample, info="Enable sampling for text generation")
      temp = _slider(0.0, 1.0, d.text_temperature, 0.05, "Temperature",
                     "Controls randomness in text generation (0=deterministic, 1=creative)")
      tokens = _slider(64, 4096, d.max_new_tokens, 64, "Max New Tokens",
                       "Maximum length of generated text, including potential thinking")
  button = gr.Button("Submit", variant="primary", elem_id="und-submit")
  _thinking_toggle(think, thinking)

  def run(image, prompt, think, sample, temp, tokens):
    settings = d.replace(think=think, do_sample=sample, text_temperature=temp, max_new_tokens=tokens)
    with page_errors():
      return service.understand(image, prompt, settings)

  gr.on(triggers=[button.click, prompt.submit], fn=run, inputs=[source, prompt, think, sample, temp, tokens],
        outputs=[thinking, answer], api_name="understand")


def build(service: svc.Service, *, title: str = "BAGEL") -> gr.Blocks:
  """The page; requests queue one at a time (with the Service's lock as a second guard)."""
  with gr.Blocks(title=title, analytics_enabled=False) as demo:
    gr.Markdown(f"## {title}\n{service.label}")
    with gr.Tab("Text to Image", elem_id="t2i-tab"):
      text_to_image_tab(service)
    with gr.Tab("Image Edit", elem_id="edit-tab"):
      edit_tab(service)
    with gr.Tab("Image Understanding", elem_id="und-tab"):
      understanding_tab(service)
  demo.queue(default_concurrency_limit=1)
  return demo


__all__ = ["build", "step_cache_controls", "page_errors", "reporter", "image_upload", "CSS"]
