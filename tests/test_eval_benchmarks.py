"""`python -m bagel_jax.eval BENCH`: every benchmark end to end on the tiny fixture model, with a few
items written in the benchmark's real format; output layouts, resume, and the offline scorers on
hand-made answers with known results.  One Inferencer is shared by the whole module."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bagel_jax.eval.__main__ import main
from bagel_jax.eval.store import RecordStore
from tests.conftest import FIXTURE_DIR

TOKENIZER = FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"
GEN_FAST = ["--resolution", "16", "--steps", "3"]  # 2 Euler steps on a 2x2 latent grid
UND_FAST = ["--max-new-tokens", "3", "--batch-size", "1"]
EDIT_FAST = ["--steps", "3", "--batch-size", "1"]  # inputs of 20x28 pixels everywhere: the compiled shapes repeat


@pytest.fixture(scope="module")
def inf():
  from bagel_jax.inference import Inferencer
  return Inferencer.from_checkpoint(FIXTURE_DIR, tokenizer=TOKENIZER, attention_impl="reference")


@pytest.fixture(scope="module")
def run(inf):
  def go(bench, data, out, *extra, replicas=None):
    argv = [bench, "--checkpoint", str(FIXTURE_DIR), "--tokenizer", str(TOKENIZER), "--data", str(data),
            "--out", str(out), "--no-progress", *extra]
    rc = main(argv, replicas=replicas or [inf])
    summary = json.loads((out / "summary.json").read_text())
    return rc, summary
  return go


def _png(path, size=(20, 28), seed=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  rgb = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
  Image.fromarray(rgb).save(path)
  return path


def _png_bytes(size=(20, 28), seed=0) -> bytes:
  buf = io.BytesIO()
  Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _mtimes(folder):
  return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and ".eval" not in p.parts
          and p.name != "summary.json"}


# ----------------------------------------------------------------------------- the contexts upstream's scripts build

class _Recorder:
  """A replica that runs `Inferencer.batch` with record=True and keeps, per call, its requests,
  keyword arguments, outputs and `inf.last` (the contexts the images were denoised against)."""

  def __init__(self, inf):
    self.inf, self.calls = inf, []

  def batch(self, requests, **kw):
    out = self.inf.batch(requests, record=True, **kw)
    self.calls.append(dict(requests=requests, kw=kw, out=out, last=self.inf.last))
    return out


def _framed(inf, text: str) -> list[int]:
  """Upstream `prepare_prompts` (modeling/bagel/bagel.py lines 245-252): bos + ids + eos, rope +1 per token."""
  t = inf.cfg.tokens
  return [t.bos_token_id, *inf.tokenizer.encode(text), t.eos_token_id]


def _block(inf, tokens: int) -> list[int]:
  """An image in a context: start-of-image, its tokens (no text id), end-of-image; rope +1."""
  return [inf.cfg.tokens.start_of_image] + [0] * tokens + [inf.cfg.tokens.end_of_image]


def _recorded(inf, ctx) -> tuple[list[int], int, int]:
  """(token ids, length, next rope) of a context recorded by the Inferencer (`last["contexts"]`)."""
  from bagel_jax.inference import kv_cache as kc
  segs, length, rope = ctx
  if not segs:
    return [], length, rope
  chunk = kc.build_chunk([segs], [0], inf.cfg, exact=True)
  return np.asarray(chunk.text_ids[0, :int(chunk.n[0])]).tolist(), length, rope


def _check_contexts(inf, call, expected: dict[str, tuple[list[int], int]]) -> None:
  """Every request's recorded contexts are `expected[name][i]` (ids, next rope), and the stacked
  contexts of the denoising loop have those lengths and positions (gen, then the CFG contexts)."""
  [group] = call["last"]["groups"]
  stacked = group["contexts"]
  n = len(call["requests"])
  for k, (name, per_request) in enumerate(expected.items()):
    for i, (ids, rope) in enumerate(per_request):
      got = _recorded(inf, call["last"]["contexts"][i][name])
      assert got == (ids, len(ids), rope), (name, i)
      assert int(stacked.lengths[k * n + i]) == len(ids) and int(stacked.next_rope[k * n + i]) == rope, (name, i)
  assert stacked.lengths.shape[0] == n * len(expected)


def _edit_expected(inf, call, think: bool) -> dict:
  """Upstream's editing scripts (eval/gen/gen_images_mp_imgedit.py `editing_image_with_think` lines 78-234,
  `editing_image` lines 299-373; the KRIS and RISE scripts are the same; eval/gen/gedit/gen_images_gedit.py
  lines 192-320): gen = [system, (VAE, ViT) per image, instruction, plan]; cfg_text = a copy of gen before
  the instruction; cfg_img = a fresh cache of [system, instruction, plan].  Without think: no system, no plan."""
  from bagel_jax.inference.inferencer import GEN_THINK_SYSTEM_PROMPT
  [request], [out] = call["requests"], call["out"]
  *images, instruction = request
  sys_ = _framed(inf, GEN_THINK_SYSTEM_PROMPT) if think else []
  blocks = []
  for im in images:
    (h, w), (vh, vw) = im.vae.shape[:2], im.vit.shape[:2]
    ld, p = inf.cfg.latent_downsample, inf.cfg.vit.patch_size
    blocks += _block(inf, (h // ld) * (w // ld)) + _block(inf, (vh // p) * (vw // p))
  text = _framed(inf, instruction)
  plan = _framed(inf, out[0]) if think else []
  assert (len(out) == 2) == think
  n_img = 2 * len(images)  # one rope id per VAE and per ViT image
  return {"gen": [(sys_ + blocks + text + plan, len(sys_) + n_img + len(text) + len(plan))],
          "cfg_text": [(sys_ + blocks, len(sys_) + n_img)],
          "cfg_img": [(sys_ + text + plan, len(sys_) + len(text) + len(plan))]}


def _check_edit_calls(inf, rec, think: bool) -> None:
  assert rec.calls
  for call in rec.calls:
    _check_contexts(inf, call, _edit_expected(inf, call, think))
    # upstream sizes the edit from images[0] (gen_images_mp_imgedit.py lines 62-71)
    first = call["requests"][0][0].vae.shape[:2]
    assert call["kw"]["output_shapes"] == [tuple(first)]
    assert call["last"]["groups"][0]["image_u8"].shape[1:3] == first


# ----------------------------------------------------------------------------- generation and editing

def test_geneval_layout_and_resume(run, tmp_path):
  meta = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
          {"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "red"}], "prompt": "a photo of a red cow"}]
  data = tmp_path / "evaluation_metadata.jsonl"
  data.write_text("".join(json.dumps(m) + "\n" for m in meta))
  out = tmp_path / "images"
  rc, s = run("geneval", data, out, *GEN_FAST, "--num-images", "2")
  assert rc == 0 and s["counts"]["generated"] == 2 and s["settings"]["num_images"] == 2
  for i, m in enumerate(meta):
    folder = out / f"{i:05d}"
    assert json.loads((folder / "metadata.jsonl").read_text()) == m
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
  with Image.open(out / "00000" / "samples" / "0000.png") as im:
    assert im.mode == "RGB" and max(im.size) <= 16
  # resume: nothing rerun, nothing rewritten; lost samples are regenerated (only they), identically
  before = _mtimes(out)
  lost = list((out / "00001" / "samples").iterdir())
  lost_bytes = [p.read_bytes() for p in lost]
  rc, s = run("geneval", data, out, *GEN_FAST, "--num-images", "2")
  assert rc == 0 and s["counts"]["generated"] == 0 and s["counts"]["finished_before"] == 2
  assert _mtimes(out) == before
  for p in lost:
    p.unlink()
  rc, s = run("geneval", data, out, *GEN_FAST, "--num-images", "2")
  assert s["counts"]["generated"] == 1 and [p.read_bytes() for p in lost] == lost_bytes
  assert {p: t for p, t in _mtimes(out).items() if p not in lost} == {p: t for p, t in before.items() if p not in lost}
  assert not list(out.rglob(".*.tmp-*"))


def test_wise_think_writes_plan_and_image(run, tmp_path, inf):
  data = tmp_path / "final_data.json"
  data.write_text(json.dumps([{"Prompt": "Traditional food of the Mid-Autumn Festival", "prompt_id": 1,
                               "Category": "Cultural knowledge", "Subcategory": "Festival"},
                              {"Prompt": "A tree in winter", "prompt_id": 7, "Category": "Natural science"}]))
  out = tmp_path / "wise"
  rec = _Recorder(inf)
  rc, s = run("wise", data, out, *GEN_FAST, "--think", "--max-think-tokens", "4", "--batch-size", "2",
              replicas=[rec])
  assert rc == 0 and s["counts"]["generated"] == 2 and s["settings"]["think"] is True
  assert s["settings"]["cfg_interval"] == [0.4, 1.0] and s["settings"]["text_temperature"] == 0.3
  assert sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "summary.json") == \
      ["1.png", "1.txt", "7.png", "7.txt"]
  # Upstream eval/gen/gen_images_mp_wise.py `generate_image_with_think`: gen = [system, prompt, plan]
  # (lines 50-117); the text-CFG branch gets `cfg_text_past_key_values=None` with the kv length and rope
  # after the system prompt (lines 62-69, 137-141): no keys, the latents at the system prompt's end.
  # Image CFG is off (no cfg_img arguments: scale 1).
  from bagel_jax.inference.inferencer import GEN_THINK_SYSTEM_PROMPT
  [call] = rec.calls
  sys_ = _framed(inf, GEN_THINK_SYSTEM_PROMPT)
  gen = [sys_ + _framed(inf, req[0]) + _framed(inf, o[0]) for req, o in zip(call["requests"], call["out"])]
  assert [o[0] for o in call["out"]] == [(out / f"{k}.txt").read_text() for k in (1, 7)]
  _check_contexts(inf, call, {"gen": [(g, len(g)) for g in gen], "cfg_text": [([], len(sys_))] * 2})


def test_imgedit_layout(run, tmp_path, inf):
  root = tmp_path / "singleturn"
  _png(root / "animal" / "a.jpg")
  _png(root / "style" / "b.png", seed=1)
  (root / "singleturn.json").write_text(json.dumps({
      "1082": {"id": "animal/a.jpg", "prompt": "Add a hat to the cat.", "edit_type": "add"},
      "2001": {"id": "style/b.png", "prompt": "Make it a watercolor.", "edit_type": "style"}}))
  out = tmp_path / "bagel"
  rec = _Recorder(inf)
  rc, s = run("imgedit", root, out, *EDIT_FAST, replicas=[rec])
  assert rc == 0 and s["counts"]["generated"] == 2
  _check_edit_calls(inf, rec, think=False)  # upstream's script runs ImgEdit without --think
  assert s["settings"]["cfg_img_scale"] == 1.5 and s["settings"]["cfg_renorm_type"] == "text_channel"
  with Image.open(out / "1082.png") as im:  # VAE resize of 20x28 (tiny tables): 32x48, then cropped to content
    assert im.size[0] <= 32 and im.size[1] <= 48
  assert (out / "2001.png").is_file()


def test_gedit_parquet_layout(run, tmp_path, inf):
  rows = {"task_type": ["background_change", "background_change"], "key": ["k1", "k1"],
          "instruction": ["Make the sky red.", "天空变红"],
          "instruction_language": ["en", "cn"],
          "input_image": [{"bytes": _png_bytes(), "path": None}, {"bytes": _png_bytes(seed=2), "path": None}]}
  (tmp_path / "gedit" / "data").mkdir(parents=True)
  pq.write_table(pa.table(rows), tmp_path / "gedit" / "data" / "train-00000-of-00001.parquet")
  out = tmp_path / "gen_image"
  rec = _Recorder(inf)
  rc, s = run("gedit", tmp_path / "gedit", out, *EDIT_FAST, replicas=[rec])
  assert rc == 0 and s["counts"]["generated"] == 2 and s["settings"]["cfg_interval"] == [0.4, 1.0]
  _check_edit_calls(inf, rec, think=False)  # run_gedit.sh runs without --use_think
  for lang in ("en", "cn"):
    folder = out / "fullset" / "background_change" / lang
    assert sorted(p.name for p in folder.iterdir()) == ["k1.png", "k1_SRCIMG.png"]
  with Image.open(out / "fullset" / "background_change" / "en" / "k1.png") as im:
    assert im.size == (32, 48)  # the VAE-resized input's size, not cropped (upstream saves the edit as decoded)


def test_kris_multi_image_and_rise(run, tmp_path, inf):
  kris = tmp_path / "KRIS_Bench"
  _png(kris / "multi-element_composition" / "2_a.jpg", seed=3)
  _png(kris / "multi-element_composition" / "2_b.jpg", size=(28, 20), seed=4)
  (kris / "multi-element_composition" / "annotation.json").write_text(json.dumps(
      {"2": {"ori_img": ["2_a.jpg", "2_b.jpg"], "ins_en": "Put the dog on the sofa."}}))
  rec = _Recorder(inf)
  rc, s = run("kris", kris, tmp_path / "results" / "bagel", *EDIT_FAST, replicas=[rec])  # two input images
  assert rc == 0 and s["counts"]["generated"] == 1
  _check_edit_calls(inf, rec, think=False)  # the edit has the FIRST image's size (the two differ)
  [[first, second, _]] = rec.calls[0]["requests"]
  assert first.vae.shape != second.vae.shape
  assert [p.name for p in (tmp_path / "results" / "bagel" / "multi-element_composition").iterdir()] == ["2.png"]

  rise = tmp_path / "rise_data"
  _png(rise / "temporal_reasoning_images" / "t1.png")
  (rise / "datav2_total_w_subtask.json").write_text(json.dumps([
      {"index": "temporal_1", "category": "temporal_reasoning", "instruction": "Show it after ten years.",
       "image": "temporal_reasoning_images/t1.png", "subtask": "Life Progression"}]))
  # run_rise.sh (and run_kris.sh) pass --think; the four editing runners share these contexts (EDIT_CONTEXTS)
  rec = _Recorder(inf)
  rc, s = run("rise", rise, tmp_path / "rise_out", *EDIT_FAST, "--think", "--max-think-tokens", "4", replicas=[rec])
  assert rc == 0 and s["settings"]["cfg_img_scale"] == 2.0
  _check_edit_calls(inf, rec, think=True)
  folder = tmp_path / "rise_out" / "temporal_reasoning"
  assert sorted(p.name for p in folder.iterdir()) == ["temporal_1.png", "temporal_1.txt"]
  assert (folder / "temporal_1.txt").read_text() == rec.calls[0]["out"][0][0]


# ----------------------------------------------------------------------------- understanding

def _mme_data(tmp_path):
  root = tmp_path / "MME_Benchmark_release_version"
  qdir = tmp_path / "Your_Results"
  qdir.mkdir()
  _png(root / "color" / "000000006723.jpg")
  _png(root / "OCR" / "images" / "0001.jpg", seed=1)
  (qdir / "color.txt").write_text("000000006723.jpg\tIs there a red coat in the image? Please answer yes or no.\tYes\n"
                                  "000000006723.jpg\tIs there a yellow coat in the image? Please answer yes or no.\tNo\n")
  (qdir / "OCR.txt").write_text("0001.jpg\tIs the word in the logo \"ABC\"? Please answer yes or no.\tYes\n"
                                "0001.jpg\tIs the word in the logo \"XYZ\"? Please answer yes or no.\tNo\n")
  return root, qdir


def test_mme_run_resume_and_score(run, tmp_path):
  root, qdir = _mme_data(tmp_path)
  out = tmp_path / "mme"
  rc, s = run("mme", root, out, "--questions", str(qdir), *UND_FAST)
  assert rc == 0 and s["counts"]["generated"] == 4
  lines = (out / "color.txt").read_text().splitlines()
  assert len(lines) == 2 and lines[0].split("\t")[:3] == [
      "000000006723.jpg", "Is there a red coat in the image? Please answer yes or no. "
      "Answer the question using a single word or phrase.", "Yes"]
  assert set(s["scores"]["subtasks"]) == {"color", "OCR"} and (out / "results.txt").is_file()
  before = _mtimes(out / "items")
  rc, s = run("mme", root, out, "--questions", str(qdir), *UND_FAST)
  assert s["counts"]["generated"] == 0 and _mtimes(out / "items") == before
  # hand-made answers: color both right (acc 1, acc+ 1 -> 200); OCR one right (acc .5, acc+ 0 -> 50)
  store = RecordStore(out)
  for key, resp in {"color/00000": "yes", "color/00001": "no, it is not", "OCR/00000": "no", "OCR/00001": "no"}.items():
    store.path(key).unlink()
    store.put(key, {"key": key, "raw": resp, "response": resp})
  rc, s = run("mme", root, out, "--questions", str(qdir), "--score-only")
  sub = s["scores"]["subtasks"]
  assert (sub["color"]["acc"], sub["color"]["acc_plus"], sub["color"]["score"]) == (1.0, 1.0, 200.0)
  assert (sub["OCR"]["acc"], sub["OCR"]["acc_plus"], sub["OCR"]["score"]) == (0.5, 0.0, 50.0)
  assert s["scores"]["Perception"] == 250.0 and s["scores"]["Cognition"] == 0


def _tsv(path, rows, header):
  path.write_text("\t".join(header) + "\n" + "".join("\t".join(str(r.get(h, "")) for h in header) + "\n" for r in rows))


def test_mmbench_xlsx_and_circular(run, tmp_path):
  from bagel_jax.eval.xlsx import read_xlsx
  img = base64.b64encode(_png_bytes()).decode()
  header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
            "comment", "split"]
  rows = [dict(index=0, question="What color is it?", hint="nan", A="red", B="blue", C="green", D="None", answer="A",
               category="color", image=img, source="x", split="dev"),
          dict(index=1000000, question="What color is it?", hint="nan", A="blue", B="green", C="red", D="None",
               answer="C", category="color", image=img, source="x", split="dev"),
          dict(index=1, question="How many?", hint="A picture.", A="1", B="2", answer="B", category="count",
               image=img, source="x", split="dev")]
  data = tmp_path / "mmbench_dev_20230712.tsv"
  _tsv(data, rows, header)
  out = tmp_path / "mmbench"
  rc, s = run("mmbench", data, out, *UND_FAST)
  assert rc == 0 and s["counts"]["generated"] == 3
  table = read_xlsx(out / "results.xlsx")
  assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
  assert [r[0] for r in table[1:]] == ["0", "1000000", "1"] and table[1][5] is None  # "None" is missing, as in pandas
  q = json.loads(RecordStore(out).path("1").read_text())
  assert q["question"] == "A picture.\nHow many?\nA. 1\nB. 2\nAnswer with the option's letter from the given choices directly."
  # hand-made: question 0 right in one circular pass only -> wrong; question 1 right
  store = RecordStore(out)
  for key, pred in {"0": "A", "1000000": "A", "1": "B"}.items():
    store.put(key, {**json.loads(store.path(key).read_text()), "prediction": pred})
  rc, s = run("mmbench", data, out, "--score-only")
  assert s["scores"]["circular_accuracy"] == 0.5 and s["scores"]["vanilla_accuracy"] == 1.0
  assert s["scores"]["per_category"] == {"color": 0.0, "count": 1.0}


def _hf_image(seed=0):
  return {"bytes": _png_bytes(seed=seed), "path": None}


def test_mmmu_prediction_and_rule_based_score(run, tmp_path):
  root = tmp_path / "MMMU"
  empty = {f"image_{k}": None for k in range(2, 8)}
  math = [dict(id="validation_Math_1", question="<image 1> What is x?", options="['1', '2', '3']", answer="B",
               question_type="multiple-choice", image_1=_hf_image(), **empty),
          dict(id="validation_Math_2", question="<image 1> Compute the ratio.", options="[]", answer="['24/7', '3.429']",
               question_type="open", image_1=_hf_image(1), **empty)]
  art = [dict(id="validation_Art_1", question="Which style? <image 1>", options="['Baroque', 'Gothic']", answer="A",
              question_type="multiple-choice", image_1=_hf_image(2), **empty)]
  for subject, rows in (("Math", math), ("Art", art)):
    (root / subject).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / subject / "validation-00000-of-00001.parquet")
  out = tmp_path / "mmmu"
  rc, s = run("mmmu", root, out, *UND_FAST)
  assert rc == 0 and s["counts"]["generated"] == 3
  assert set(json.loads((out / "prediction.json").read_text())) == {"validation_Math_1", "validation_Math_2",
                                                                     "validation_Art_1"}
  store = RecordStore(out)
  for key, ans in {"validation_Math_1": "B", "validation_Math_2": "The ratio is 3.429.", "validation_Art_1": "B"}.items():
    store.put(key, {**json.loads(store.path(key).read_text()), "answer": ans})
  rc, s = run("mmmu", root, out, "--score-only")
  sc = s["scores"]
  assert sc["Math"] == {"num": 2, "acc": 1.0} and sc["Art"] == {"num": 1, "acc": 0.0}
  assert sc["Overall"] == {"num": 3, "acc": 0.667} and sc["Overall-Science"] == {"num": 2, "acc": 1.0}
  assert "Overall: num=3, acc=0.667" in (out / "results.txt").read_text()


def test_mmvet_and_mathvista_outputs(run, tmp_path):
  mmvet = tmp_path / "mm-vet"
  _png(mmvet / "images" / "v1_0.png")
  (mmvet / "llava-mm-vet.jsonl").write_text(json.dumps({"question_id": 0, "image": "v1_0.png",
                                                        "text": "What is the total price?"}) + "\n")
  rc, s = run("mmvet", mmvet, tmp_path / "mmvet_out", *UND_FAST)
  assert rc == 0 and list(json.loads((tmp_path / "mmvet_out" / "results.json").read_text())) == ["v1_0"]

  mv = tmp_path / "MathVista" / "data"
  mv.mkdir(parents=True)
  rows = [dict(pid="1", question="What is the value?", image="images/1.jpg", decoded_image=_hf_image(),
               choices=None, unit=None, precision=1.0, answer="1.2", question_type="free_form", answer_type="float",
               metadata={"split": "testmini", "source": "x"}, query="Hint: ... Question: What is the value?")]
  pq.write_table(pa.Table.from_pylist(rows), mv / "testmini-00000-of-00001.parquet")
  rc, s = run("mathvista", mv.parent, tmp_path / "mv_out", *UND_FAST)
  res = json.loads((tmp_path / "mv_out" / "results.json").read_text())
  assert rc == 0 and set(res) == {"1"} and "response" in res["1"] and "decoded_image" not in res["1"]
  assert res["1"]["metadata"] == {"split": "testmini", "source": "x"}


def test_pope_run_and_score(run, tmp_path):
  root = tmp_path / "pope"
  _png(root / "val2014" / "COCO_val2014_000000000001.jpg")
  qs = [{"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "category": "adversarial",
         "text": f"Is there a {o} in the image?\nAnswer the question using a single word or phrase."}
        for o in ("dog", "cat", "car", "tree")]
  (root / "llava_pope_test.jsonl").write_text("".join(json.dumps({**q, "question_id": i + 1}) + "\n" for i, q in enumerate(qs)))
  (root / "coco").mkdir()
  (root / "coco" / "coco_pope_adversarial.json").write_text(
      "".join(json.dumps({"question_id": i + 1, "label": lab}) + "\n" for i, lab in enumerate(["yes", "no", "yes", "no"])))
  out = tmp_path / "pope_out"
  rc, s = run("pope", root, out, *UND_FAST)
  assert rc == 0 and len(json.loads((out / "results.json").read_text())) == 4
  store = RecordStore(out)
  for key, text in {"1": "Yes", "2": "No, there is not.", "3": "No.", "4": "Yes, there is"}.items():
    store.put(key, {**json.loads(store.path(key).read_text()), "text": text})
  rc, s = run("pope", root, out, "--score-only")
  m = s["scores"]["adversarial"]
  assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (1, 1, 1, 1)
  assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["f1"] == 0.5 and s["scores"]["mean_f1"] == 0.5


def test_mmvp_pairs_and_two_devices(run, tmp_path, inf):
  root = tmp_path / "MMVP"
  _png(root / "MMVP Images" / "1.jpg")
  _png(root / "MMVP Images" / "2.jpg", seed=1)
  (root / "Questions.csv").write_text(
      "lndex,Question,Options,Correct Answer\n"
      "1,Is the dog facing left?,(a) Yes (b) No,(a)\n"
      "2,Is the dog facing left?,(a) Yes (b) No,(b)\n")
  out = tmp_path / "mmvp_out"
  rc, s = run("mmvp", root, out, *UND_FAST)
  assert rc == 0 and len((out / "results.jsonl").read_text().splitlines()) == 2
  store = RecordStore(out)
  first = {k: store.get(k)["raw"] for k in ("1", "2")}
  for key, ans in {"1": "A", "2": "B"}.items():
    store.put(key, {**json.loads(store.path(key).read_text()), "answer": ans})
  rc, s = run("mmvp", root, out, "--score-only")
  assert s["scores"] == {"pair_accuracy": 1.0, "pairs": 1}
  assert (out / "results.txt").read_text() == "The accuracy is 1.0"
  # data-parallel over two devices (one replica and worker thread each): the same greedy answers
  import jax

  from bagel_jax.eval.runner import build_replicas
  replicas = build_replicas(inf, jax.devices()[:2])
  assert [jax.tree.leaves(r.params)[0].devices() for r in replicas] == [{d} for d in jax.devices()[:2]]
  rc, s = run("mmvp", root, tmp_path / "two", *UND_FAST, replicas=replicas)
  assert rc == 0 and s["per_process"][0]["replicas"] == 2
  two = RecordStore(tmp_path / "two")
  assert all(two.get(k)["raw"] == first[k] for k in ("1", "2"))


def test_vqa_accuracy(run, tmp_path):
  root = tmp_path / "textvqa"
  _png(root / "train_images" / "a.jpg")
  (root / "textvqa_val.jsonl").write_text(
      json.dumps({"image": "train_images/a.jpg", "question": "What brand is it?", "question_id": 34602}) + "\n" +
      json.dumps({"image": "train_images/a.jpg", "question": "How many?", "question_id": 34603}) + "\n")
  ann = {"annotations": [{"question_id": 34602, "answers": [{"answer": a} for a in ["Nokia"] * 2 + ["nokia."] + ["lg"] * 7]},
                         {"question_id": 34603, "answers": [{"answer": "two"}] * 10}]}
  (root / "ann.json").write_text(json.dumps(ann))
  out = tmp_path / "vqa_out"
  argv = ["--dataset", "textvqa_val", "--annotation", str(root / "ann.json")]
  rc, s = run("vqa", root / "textvqa_val.jsonl", out, *UND_FAST, *argv)
  res = json.loads((out / "results.json").read_text())
  assert rc == 0 and [r["question_id"] for r in res] == [34602, 34603]
  assert res[0]["question"] == "What brand is it? Answer the question using a single word or phrase."
  store = RecordStore(out)
  for key, resp in {"0000000": "Nokia", "0000001": "2"}.items():
    store.put(key, {**json.loads(store.path(key).read_text()), "response": resp})
  rc, s = run("vqa", root / "textvqa_val.jsonl", out, "--score-only", *argv)
  # 'nokia' matches 3 human answers: each leave-one-out gives min(1, 3/3) or min(1, 2/3) -> 0.9; "2" = "two" -> 1
  assert s["scores"]["vqa_score"] == pytest.approx((0.9 + 1.0) / 2)


# ----------------------------------------------------------------------------- scorer and parser units

def test_scorer_units():
  from bagel_jax.eval.mmmu_metrics import parse_open_response
  from bagel_jax.eval.understanding import option_letter
  from bagel_jax.eval.vqa_metrics import anls, normalize_answer, relaxed_accuracy
  assert normalize_answer("Two dogs!") == "2 dogs" and normalize_answer("The Cat's hat.") == "cat 's hat"
  assert normalize_answer("dont") == "don't"
  assert set(parse_open_response("So the answer is 1,000.")) >= {1000.0}
  assert option_letter("B. blue", {"A": "red", "B": "blue"}) == "B"
  assert option_letter("It is blue", {"A": "red", "B": "blue"}) == "B"
  assert option_letter("", {"A": "red"}) == "C" and option_letter("", {"A": "red"}, empty=None) == ""
  assert relaxed_accuracy(["10.4"], [["10"]]) == 1.0 and relaxed_accuracy(["11"], [["10"]]) == 0.0
  assert anls(["hello"], [["hallo"]]) == pytest.approx(0.8) and anls(["abc"], [["xyz"]]) == 0.0


def test_bad_input_is_one_line(run, tmp_path, capsys):
  rc = main(["geneval", "--checkpoint", str(FIXTURE_DIR), "--data", str(tmp_path / "missing.jsonl"),
             "--out", str(tmp_path / "o")], replicas=[])
  err = capsys.readouterr().err
  assert rc == 2 and "missing.jsonl" in err and "Traceback" not in err
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"tag": "x"}\n')
  assert main(["geneval", "--checkpoint", str(FIXTURE_DIR), "--data", str(bad), "--out", str(tmp_path / "o")],
              replicas=[]) == 2
  assert "missing field 'prompt'" in capsys.readouterr().err
  assert main(["nosuch"]) == 2


def test_items_sharded_over_processes(run, tmp_path, monkeypatch, inf):
  """Item i runs on process i % count; process 0 waits, merges the per-process counts, scores.
  Then --devices-per-replica 2 on 4 of the 8 test devices gives the same answers."""
  import jax

  from bagel_jax.eval import runner
  root = tmp_path / "mmvp"
  for i in range(1, 5):
    _png(root / "MMVP Images" / f"{i}.jpg", seed=i)
  (root / "Questions.csv").write_text("Index,Question,Options,Correct Answer\n" + "".join(
      f"{i},Is the dog facing left?,(a) Yes (b) No,(a)\n" for i in range(1, 5)))
  out = tmp_path / "out"
  monkeypatch.setattr(runner, "barrier", lambda name: None)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  argv = ["mmvp", "--checkpoint", str(FIXTURE_DIR), "--tokenizer", str(TOKENIZER), "--data", str(root), "--out",
          str(out), "--no-progress", *UND_FAST]
  assert main(argv, replicas=[inf]) == 0
  assert sorted(p.stem for p in (out / "items").iterdir()) == ["2", "4"] and not (out / "summary.json").exists()
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert main(argv, replicas=[inf]) == 0
  s = json.loads((out / "summary.json").read_text())
  assert [p["counts"]["generated"] for p in s["per_process"]] == [2, 2] and s["counts"]["generated"] == 4
  assert s["scores"]["pairs"] == 2
  # One real process, --devices 4 --devices-per-replica 2: the CLI loads the checkpoint and builds two
  # tensor-parallel replicas of 2 devices (the one batch runs on the first): the same answers.
  monkeypatch.undo()
  tp = tmp_path / "tp"
  argv = argv[:argv.index("--out") + 1] + [str(tp), "--no-progress", "--max-new-tokens", "3", "--batch-size", "4",
                                           "--devices", "4", "--devices-per-replica", "2"]
  assert main(argv) == 0
  assert json.loads((tp / "summary.json").read_text())["per_process"][0]["replicas"] == 2
  assert (tp / "results.jsonl").read_text() == (out / "results.jsonl").read_text()
