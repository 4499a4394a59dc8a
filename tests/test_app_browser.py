"""The web app in a real browser: `python -m bagel_jax.app` with the fixture model, driven by headless
Chromium through playwright (the system's Chromium: Debian's `chromium` package).

Generates an image from a prompt and checks that it appeared (decoded, the model's 64 x 64), that
an empty prompt gets a message in the page, that the understanding tab answers about an uploaded
image and refuses a file that is not an image; the denoising progress is read through the app's
queue.  Screenshots go to the test's temp folder.  Skipped (with the reason) only when no Chromium
is installed; BAGEL_REQUIRE_BROWSER=1 (set by .ci/run) turns that into a failure.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FIXTURE_DIR

pytestmark = pytest.mark.browser

TOKENIZER = FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-proxy-server"]
WAIT_MS = 240_000  # compiling the sampler on a busy 2-core machine


def chromium() -> str | None:
  for path in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
    if path and os.access(path, os.X_OK):
      return path
  return None


def browser_or_skip() -> str:
  """The Chromium executable, or skip (fail under BAGEL_REQUIRE_BROWSER=1) saying what is missing."""
  missing = None
  try:
    import gradio  # noqa: F401
    import playwright.sync_api  # noqa: F401
  except ImportError as e:
    missing = f"{e.name} is not installed (pip install -e '.[test]')"
  path = chromium()
  if path is None:
    missing = "no Chromium installed (apt-get install -y chromium)"
  if missing:
    if os.environ.get("BAGEL_REQUIRE_BROWSER") == "1":
      pytest.fail(f"{missing}, and BAGEL_REQUIRE_BROWSER=1 requires the browser test")
    pytest.skip(missing)
  return path


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen, log: pathlib.Path, timeout: float = 240.0) -> None:
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  end = time.time() + timeout
  while time.time() < end:
    if proc.poll() is not None:
      pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    try:
      if opener.open(url, timeout=5).status == 200:
        return
    except OSError:
      time.sleep(0.5)
  pytest.fail(f"the app did not serve {url} within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def app(tmp_path):
  browser_or_skip()
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
             HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # one CPU device
  log = tmp_path / "app.log"
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "bagel_jax.app", "--checkpoint", str(FIXTURE_DIR),
                             "--tokenizer", str(TOKENIZER), "--server-port", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
  url = f"http://127.0.0.1:{port}/"
  try:
    wait_until_serving(url, proc, log)
    yield url, log
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def textarea(page, elem_id: str):
  return page.locator(f"#{elem_id} textarea")


def generate_image(page, shots: pathlib.Path) -> None:
  textarea(page, "t2i-prompt").fill("   ")
  page.locator("#t2i-generate").click()
  page.get_by_text("Please enter a prompt.").first.wait_for(timeout=WAIT_MS)  # in the page, no trace
  textarea(page, "t2i-prompt").fill("a red cat")
  page.locator("#t2i-generate").click()
  img = page.locator("#t2i-image img")
  img.wait_for(timeout=WAIT_MS)
  page.wait_for_function("() => { const i = document.querySelector('#t2i-image img');"
                         " return i && i.complete && i.naturalWidth > 0; }", timeout=WAIT_MS)
  size = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
  assert size == [64, 64], size  # 1:1 at the fixture's largest side (8 latent tokens x 8 px)
  page.screenshot(path=str(shots / "text_to_image.png"), full_page=True)


def understand_image(page, shots: pathlib.Path) -> str:
  photo, junk = shots / "photo.png", shots / "junk.png"
  Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(photo)
  junk.write_text("not an image")
  page.get_by_role("tab", name="Image Understanding").click()
  page.locator("#und-input input[type=file]").set_input_files(str(junk))
  textarea(page, "und-prompt").fill("What is in this image?")
  page.locator("#und-submit").click()
  page.get_by_text("not a readable image").first.wait_for(timeout=WAIT_MS)
  page.locator("#und-input input[type=file]").set_input_files(str(photo))
  page.locator("#und-input img").wait_for(timeout=WAIT_MS)
  page.locator("#und-submit").click()
  page.wait_for_function("() => document.querySelector('#und-answer textarea').value.length > 0", timeout=WAIT_MS)
  page.screenshot(path=str(shots / "understanding.png"), full_page=True)
  return textarea(page, "und-answer").input_value()


def denoising_progress(url: str) -> set:
  """Progress updates the queue sends while a (compiled) text-to-image request denoises."""
  from gradio_client import Client
  client = Client(url, verbose=False)
  # Ratio, prompt, then GEN_NAMES' controls: the page's defaults (50 timesteps) with seed 1.
  job = client.submit("1:1", "a red cat", False, 1, 4.0, 0.4, "global", 0.0, 50, 3.0, False, 1024, 0.3,
                      api_name="/text_to_image")
  seen = set()
  while not job.done():
    for p in job.status().progress_data or []:
      seen.add((p.desc, p.index, p.length))
    time.sleep(0.01)
  assert pathlib.Path(job.result()[0]).is_file()
  return seen


def test_generate_and_understand_in_the_browser(app, tmp_path):
  from playwright.sync_api import sync_playwright
  url, log = app
  with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)
    try:
      page = browser.new_page(viewport={"width": 1200, "height": 900})
      page.goto(url, wait_until="domcontentloaded")
      generate_image(page, tmp_path)
      answer = understand_image(page, tmp_path)
    finally:
      browser.close()
  assert answer.strip(), answer
  assert (tmp_path / "text_to_image.png").stat().st_size > 0 and (tmp_path / "understanding.png").stat().st_size > 0
  seen = denoising_progress(url)
  assert seen and {d for d, _, _ in seen} == {"denoising"} and {n for _, _, n in seen} == {49}, seen
  assert "Traceback" not in log.read_text()


def test_a_missing_browser_is_a_stated_skip_or_a_failure(monkeypatch):
  monkeypatch.setattr(sys.modules[__name__], "chromium", lambda: None)
  monkeypatch.delenv("BAGEL_REQUIRE_BROWSER", raising=False)
  with pytest.raises(pytest.skip.Exception, match="no Chromium installed"):
    browser_or_skip()
  monkeypatch.setenv("BAGEL_REQUIRE_BROWSER", "1")
  with pytest.raises(pytest.fail.Exception, match="BAGEL_REQUIRE_BROWSER=1 requires the browser test"):
    browser_or_skip()
