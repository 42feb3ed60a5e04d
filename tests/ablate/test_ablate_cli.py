"""`dq3jax ablate` end to end: table on stdout, JSON report and PNG plots."""

from __future__ import annotations

import json

from dq3jax import cli


def test_ablate_end_to_end(tmp_path, capsys):
  report, plot = tmp_path / "r.json", tmp_path / "out" / "p.png"
  rc = cli.main([
    "ablate", "builtin:v3-tiny", "--layers", "2", "--recipes", "F32,Q8_0", "--ctx", "12", "--sequences", "2",
    "--sensitivity", "--sensitivity-type", "Q8_0", "--report", str(report), "--plot", str(plot), "--verbose",
    "--no-progress",
  ])  # fmt: skip
  assert rc == 0
  out = capsys.readouterr().out
  assert (
    "| recipe | bpw | size MiB | mean KLD ± unc |" in out and "| F32 | 32.000 |" in out and "| Q8_0 |" in out
  )
  assert "====== KL divergence statistics ======" in out and "Same top p:" in out  # --verbose blocks
  assert "Sensitivity: one class at a time at Q8_0" in out and "By layer group (per layer)" in out
  d = json.loads(report.read_text())
  assert [r["recipe"] for r in d["recipes"]] == ["F32", "Q8_0"]
  assert d["tokens"]["kind"] == "sampled" and d["tokens"]["shape"] == [2, 12]
  assert d["model"]["name"] == "builtin:v3-tiny" and d["model"]["layers"] == 2
  classes = d["sensitivity"]["classes"]
  assert [c["rank"] for c in classes] == list(range(1, len(classes) + 1)) and len(classes) == 8
  means = [c["stats"]["mean_kld"] for c in classes]
  assert means == sorted(means, reverse=True)
  assert d["timings"]["total_s"] > 0
  for png in (plot, tmp_path / "out" / "p-sensitivity.png"):
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p-sensitivity.png", "p.png"]
