"""The device check's CPU-runnable path (`--tiny`): interpreted kernels vs the reference in bf16,
the report files; and its refusals.  (The train section is left out: a tiny train step compiles
for minutes on 2 shared cores; `python -m bagel_jax.bench train_step --tiny` runs it.)"""

from __future__ import annotations

import json

from bagel_jax.bench import device


def test_tiny_device_check_writes_json_and_markdown(tmp_path, capsys):
  rc = device.main(["--tiny", "--sections", "kernels,memory", "--out", str(tmp_path)])
  report = json.loads((tmp_path / "device_check.json").read_text())
  assert rc == 0, report
  k = report["sections"]["kernels"]
  assert k["ok"] and k["impl"] == "pallas_tpu" and k["decode_impl"] == "xla"
  for x in ("forward", "dq", "dk", "dv", "decode"):  # bf16 against float32: small, never exactly 0
    assert 0 < k[f"{x}_rel_err"] < 2e-2, (x, k)
  md = (tmp_path / "device_check.md").read_text()
  assert "| kernels | forward_rel_err |" in md and "| memory | seconds |" in md


def test_refusals(capsys):
  assert device.main(["--sections", "kernels,bogus"]) == 2
  assert "unknown section 'bogus'" in capsys.readouterr().err
  assert device.main(["--sections", "kernels"]) == 2  # no accelerator and no --tiny
  assert "no GPU or TPU" in capsys.readouterr().err
