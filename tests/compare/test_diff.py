"""`dq3jax diff` end to end through the command line: verdicts, reports, exit codes, bad input."""

from __future__ import annotations

import json
import pathlib
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dq3jax import cli
from dq3jax.compare import diff
from dq3jax.io import gguf_read
from reference import dump_example
from tests.compare import synth

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "goldens"
KERNEL = GOLDENS / "kernels" / "Q4_K-imatrix.safetensors"


def run_diff(golden, candidate, *extra, tmp_path=None) -> tuple[int, dict | None]:
  args = ["diff", str(golden), str(candidate), *extra]
  report = None
  if tmp_path is not None:
    report = tmp_path / "report.json"
    args += ["--report", str(report)]
  code = cli.main(args)
  return code, (json.loads(report.read_text()) if report is not None else None)


@pytest.fixture()
def outputs_golden(tmp_path):
  return synth.write_outputs_golden(tmp_path / "golden" / "outputs.safetensors")


# --------------------------------------------------------------------------------------------- kernels


def test_kernel_identical_candidate_passes(tmp_path, capsys):
  t = load_file(str(KERNEL))
  cand = tmp_path / "cand.npz"
  np.savez(cand, **t)
  code, rep = run_diff(KERNEL, cand, tmp_path=tmp_path)
  assert code == 0 and rep["result"] == "PASS"
  assert rep["golden"]["manifest"]["relpath"] == "kernels/Q4_K-imatrix.safetensors"
  assert {r["name"] for r in rep["rows"]} == {"x", "imatrix", "quantized", "dequantized"}
  out = capsys.readouterr().out
  assert "| quantized | bytes | identical" in out and "sha256 verified" in out


def test_kernel_one_bit_flip_names_block_row_and_bits(tmp_path, capsys):
  t = load_file(str(KERNEL))
  q = t["quantized"].copy()
  row_bytes = q.shape[1]  # Q4_K: 144 bytes per block of 256
  q[5, 144 + 17] ^= 0x04  # row 5, block 1, byte 17 of the block, bit 2
  cand = tmp_path / "cand.npz"
  np.savez(cand, quantized=q, dequantized=t["dequantized"])
  code, rep = run_diff(KERNEL, cand, tmp_path=tmp_path)
  assert code == 1 and rep["result"] == "FAIL"
  row = next(r for r in rep["rows"] if r["name"] == "quantized")
  first = row["metrics"]["first"]
  assert row["status"] == "FAIL" and row["metrics"]["blocks_differ"] == 1
  assert (first["row"], first["block"], first["byte_offset"]) == (5, 1, 5 * row_bytes + 144)
  assert first["bytes"] == [
    {
      "offset_in_block": 17,
      "golden": int(t["quantized"][5, 161]),
      "candidate": int(q[5, 161]),
      "xor": 4,
      "bits": [2],
    }
  ]
  assert "row 5, block 1" in capsys.readouterr().out


def test_kernel_npy_candidates_are_named_by_dtype(tmp_path):
  t = load_file(str(KERNEL))
  deq = t["dequantized"].copy()
  deq[1, 7] = np.nextafter(deq[1, 7], np.float32(np.inf))
  np.save(tmp_path / "deq.npy", deq)
  np.save(tmp_path / "q.npy", t["quantized"])
  code, rep = run_diff(KERNEL, tmp_path / "deq.npy", tmp_path=tmp_path)
  assert code == 1 and rep["rows"][0]["name"] == "dequantized"
  assert rep["rows"][0]["metrics"]["max_ulp"] == 1 and rep["rows"][0]["metrics"]["max_ulp_index"] == [1, 7]
  assert run_diff(KERNEL, tmp_path / "q.npy")[0] == 0


def test_kernel_candidate_with_other_inputs_is_bad_input(tmp_path, capsys):
  t = load_file(str(KERNEL))
  t["x"] = t["x"] * 2
  np.savez(tmp_path / "cand.npz", **t)
  assert run_diff(KERNEL, tmp_path / "cand.npz")[0] == 2
  assert "'x' differs from the golden's input" in capsys.readouterr().err


def test_tampered_golden_is_bad_input(tmp_path, capsys):
  rel = "kernels/Q8_0-ref.safetensors"
  (tmp_path / "g" / "kernels").mkdir(parents=True)
  shutil.copy(GOLDENS / "manifest.json", tmp_path / "g" / "manifest.json")
  golden = tmp_path / "g" / rel
  blob = bytearray((GOLDENS / rel).read_bytes())
  cand = tmp_path / "cand.safetensors"
  cand.write_bytes(bytes(blob))
  blob[-3] ^= 0x01
  golden.write_bytes(bytes(blob))
  code, rep = run_diff(golden, cand, tmp_path=tmp_path)
  err = capsys.readouterr().err
  assert code == 2 and rep["result"] == "ERROR"
  assert str(golden) in err and "does not match" in err and "manifest.json" in err
  assert "Traceback" not in err


# ---------------------------------------------------------------------------------------- model outputs


def test_identical_outputs_pass_with_llama_names(outputs_golden, tmp_path):
  t = load_file(str(outputs_golden))
  np.savez(tmp_path / "cand.npz", **t)
  code, rep = run_diff(outputs_golden, tmp_path / "cand.npz", tmp_path=tmp_path)
  assert code == 0 and rep["first_divergence"] is None and rep["not_supplied"] == []
  logits = next(r for r in rep["rows"] if r["name"] == "logits")
  m = logits["metrics"]
  assert m["Mean KLD"] == 0 and m["Same top p"] == 100 and m["positions"] == synth.T
  assert m["Δp positions"] == synth.T - 1 and m["RMS Δp"] == 0 and "99.9% KLD" in m and "Median KLD" in m
  dec = next(r for r in rep["rows"] if r["name"] == "decode_logits")
  assert dec["metrics"]["Δp positions"] == synth.T - synth.PREFILL - 1


def test_perturbed_intermediates_name_first_layer_and_token(outputs_golden, tmp_path, capsys):
  t = load_file(str(outputs_golden))
  for i in (1, 2):  # an engine diverging at layer 1 token 3 diverges everywhere after it
    for stage in ("hidden_after_attn", "hidden_after_mlp"):
      a = t[f"blk.{i}.{stage}"].copy()
      a[3:] += 0.05
      t[f"blk.{i}.{stage}"] = a
  t["blk.0.hidden_after_mlp"] = t["blk.0.hidden_after_mlp"] * np.float32(1 + 1e-7)  # within bounds
  np.savez(tmp_path / "cand.npz", **t)
  code, rep = run_diff(outputs_golden, tmp_path / "cand.npz", tmp_path=tmp_path)
  assert code == 1
  fd = rep["first_divergence"]
  assert (fd["layer"], fd["tensor"], fd["token"]) == (1, "blk.1.hidden_after_attn", 3)
  status = {r["name"]: r["status"] for r in rep["rows"]}
  assert status["blk.0.hidden_after_mlp"] == "PASS" and status["blk.1.attn_latent"] == "PASS"
  assert status["blk.1.hidden_after_attn"] == "FAIL"
  assert "first divergence: layer 1, blk.1.hidden_after_attn, token 3" in capsys.readouterr().out


def test_router_divergence_and_weights_by_expert(outputs_golden, tmp_path):
  t = load_file(str(outputs_golden))
  # Same sets in another order pass (weights follow their ids); one changed set at layer 2 token 6 fails.
  ids, w = t["blk.1.topk_ids"][:, ::-1].copy(), t["blk.1.topk_weights"][:, ::-1].copy()
  ids2 = t["blk.2.topk_ids"].copy()
  ids2[6, 0] = next(e for e in range(synth.E) if e not in ids2[6])
  cand = {
    "blk.1.topk_ids": ids,
    "blk.1.topk_weights": w,
    "blk.2.topk_ids": ids2,
    "blk.2.topk_weights": t["blk.2.topk_weights"],
  }
  np.savez(tmp_path / "cand.npz", **cand)
  code, rep = run_diff(outputs_golden, tmp_path / "cand.npz", tmp_path=tmp_path)
  rows = {r["name"]: r for r in rep["rows"]}
  assert code == 1
  assert rows["blk.1.topk_ids"]["status"] == "PASS" and rows["blk.1.topk_weights"]["status"] == "PASS"
  assert rows["blk.2.topk_ids"]["metrics"]["positions_differ"] == 1
  assert rows["blk.2.topk_weights"]["metrics"]["positions_compared"] == synth.T - 1
  assert rep["first_divergence"]["tensor"] == "blk.2.topk_ids" and rep["first_divergence"]["token"] == 6


def test_logits_only_npy_and_raw_dump(outputs_golden, tmp_path):
  logits = load_file(str(outputs_golden))["logits"]
  np.save(tmp_path / "l.npy", logits[None])  # [1, T, V] as `dq3jax logits` writes
  logits.astype("<f4").tofile(tmp_path / "l.bin")
  for cand in ("l.npy", "l.bin"):
    code, rep = run_diff(outputs_golden, tmp_path / cand, tmp_path=tmp_path)
    assert code == 0 and [r["name"] for r in rep["rows"]] == ["logits"]
  (tmp_path / "short.bin").write_bytes(logits.tobytes()[:-4])
  assert run_diff(outputs_golden, tmp_path / "short.bin")[0] == 2


def test_logit_thresholds_profile_and_overrides(outputs_golden, tmp_path, capsys):
  logits = load_file(str(outputs_golden))["logits"]
  rng = np.random.default_rng(1)
  np.save(tmp_path / "l.npy", (logits + 0.05 * rng.standard_normal(logits.shape)).astype(np.float32))
  code, rep = run_diff(outputs_golden, tmp_path / "l.npy", tmp_path=tmp_path)
  kld = rep["rows"][0]["metrics"]["Mean KLD"]
  assert code == 1 and 1e-4 < kld < 5e-3 and rep["profile"] == "float32"
  capsys.readouterr()
  code, rep = run_diff(
    outputs_golden, tmp_path / "l.npy", "--threshold", "logits_mean_kld=0.01", tmp_path=tmp_path
  )
  assert code == 0 and rep["overrides"]["logits_mean_kld"]["change"] == "looser"
  assert "LOOSER" in capsys.readouterr().out  # a loosened bound is never silent


def test_profile_follows_the_goldens_emulation_and_settings_must_match(tmp_path, capsys):
  t = synth.outputs_tensors()
  golden = synth.write_outputs_golden(tmp_path / "g.safetensors", t, emulation="llama-cpu", kv_cache="f16")
  np.save(tmp_path / "l.npy", t["logits"])
  code, rep = run_diff(golden, tmp_path / "l.npy", tmp_path=tmp_path)
  assert code == 0 and rep["profile"] == "llama-cpu"
  assert rep["thresholds"]["router_tie_gap"] == diff.PROFILES["llama-cpu"].router_tie_gap
  # An engine that says it ran another KV cache type than the golden emulates is bad input, naming the file
  # to use instead.
  meta = json.dumps({"kv_cache": "f32", "threads": 1})
  np.savez(tmp_path / "c.npz", logits=t["logits"], **{"meta.llama_cpp": np.array(meta)})
  assert run_diff(golden, tmp_path / "c.npz")[0] == 2
  assert "llama-cpu.safetensors" in capsys.readouterr().err
  np.savez(
    tmp_path / "ok.npz", logits=t["logits"], **{"meta.llama_cpp": np.array(meta.replace("f32", "f16"))}
  )
  code, rep = run_diff(golden, tmp_path / "ok.npz", tmp_path=tmp_path)
  assert code == 0 and rep["unknown_candidate_tensors"] == []


def _routing_golden(tmp_path):
  root = tmp_path / "goldens"
  rel = "models/m/outputs/F32.safetensors"
  t = synth.with_router_scores(synth.outputs_tensors())
  synth.write_outputs_golden(root / rel, t)
  synth.write_manifest(root, {rel: "model-outputs"}, config=synth.ROUTER_CONFIG)
  return root / rel, t


def test_expert_flip_at_a_near_tie_is_explained_at_a_decisive_gap_fails(tmp_path, capsys):
  golden, t = _routing_golden(tmp_path)
  ids = t["blk.1.topk_ids"].copy()
  # A near-tie at token 3 between its second expert and an unselected one.
  scores = t["blk.1.router_scores"].copy()
  other = next(e for e in range(synth.E) if e not in ids[3])
  scores[3, other] = scores[3, ids[3, 1]] - 1e-7
  t["blk.1.router_scores"] = scores
  synth.write_outputs_golden(golden, t)
  synth.write_manifest(
    golden.parents[3], {"models/m/outputs/F32.safetensors": "model-outputs"}, config=synth.ROUTER_CONFIG
  )
  cand = {k: v for k, v in t.items() if k != "blk.1.router_scores"}
  cand["blk.1.topk_ids"] = ids.copy()
  cand["blk.1.topk_ids"][3, 1] = other
  np.savez(tmp_path / "near.npz", **{k: cand[k] for k in ("tokens", "logits", "blk.1.topk_ids")})
  code, rep = run_diff(golden, tmp_path / "near.npz", tmp_path=tmp_path)
  row = {r["name"]: r for r in rep["rows"]}["blk.1.topk_ids"]
  assert (
    code == 0 and row["metrics"]["positions_explained"] == 1 and row["metrics"]["positions_decisive"] == 0
  )
  assert "explained" in row["summary"] and "token 3" in row["summary"]
  # The same flip at a token whose gap is large (>= 0.2 by construction) is decisive.
  cand["blk.1.topk_ids"] = ids.copy()
  cand["blk.1.topk_ids"][5, 1] = next(e for e in range(synth.E) if e not in ids[5])
  np.savez(tmp_path / "far.npz", **{k: cand[k] for k in ("tokens", "logits", "blk.1.topk_ids")})
  code, rep = run_diff(golden, tmp_path / "far.npz", tmp_path=tmp_path)
  row = {r["name"]: r for r in rep["rows"]}["blk.1.topk_ids"]
  assert code == 1 and row["metrics"]["positions_decisive"] == 1 and row["metrics"]["first"]["token"] == 5
  assert row["metrics"]["first"]["golden_gap"] >= 0.2
  fd = rep["first_divergence"]
  assert (fd["layer"], fd["tensor"], fd["token"], fd["metric"]) == (
    1,
    "blk.1.topk_ids",
    5,
    "decisive expert flip",
  )
  assert "DECISIVE" in capsys.readouterr().out


def test_non_finite_candidate_logits_fail(outputs_golden, tmp_path):
  logits = load_file(str(outputs_golden))["logits"].copy()
  logits[4, 2] = np.nan
  np.save(tmp_path / "l.npy", logits)
  code, rep = run_diff(outputs_golden, tmp_path / "l.npy", tmp_path=tmp_path)
  assert code == 1 and "position 4, token 2" in rep["rows"][0]["summary"]
  assert rep["first_divergence"]["tensor"] == "logits" and rep["first_divergence"]["token"] == 4


def test_dump_example_writer_round_trips(outputs_golden, tmp_path):
  t = load_file(str(outputs_golden))
  layers = [
    {k.split(".", 2)[2]: v[None] for k, v in t.items() if k.startswith(f"blk.{i}.")}
    for i in range(synth.LAYERS)
  ]
  dump_example.write_dump(
    tmp_path / "cand.npz",
    tokens=t["tokens"],
    logits=t["logits"][None],
    decode_logits=t["decode_logits"],
    layers=layers,
  )
  code, rep = run_diff(outputs_golden, tmp_path / "cand.npz", tmp_path=tmp_path)
  assert code == 0 and rep["not_supplied"] == [] and rep["unknown_candidate_tensors"] == []


def test_golden_kind_from_manifest(tmp_path):
  root = tmp_path / "goldens"
  rel = "models/m/outputs/F32.safetensors"
  t = synth.outputs_tensors()
  # No metadata in the file: the manifest says what it is.
  (root / rel).parent.mkdir(parents=True)
  save_file(t, str(root / rel))
  synth.write_manifest(root, {rel: "model-outputs"})
  np.save(tmp_path / "l.npy", t["logits"])
  code, rep = run_diff(root / rel, tmp_path / "l.npy", tmp_path=tmp_path)
  assert (
    code == 0 and rep["golden"]["kind"] == "model-outputs" and rep["golden"]["manifest"]["relpath"] == rel
  )


# ------------------------------------------------------------------------------------------- bad input


def test_wrong_shape_is_bad_input(outputs_golden, tmp_path, capsys):
  t = load_file(str(outputs_golden))
  np.savez(tmp_path / "cand.npz", logits=t["logits"][:5])
  code, rep = run_diff(outputs_golden, tmp_path / "cand.npz", tmp_path=tmp_path)
  err = capsys.readouterr().err
  assert code == 2 and "cand.npz" in err and "'logits'" in err and "[5, 16]" in err
  assert rep["exit_code"] == 2 and "'logits'" in rep["error"]


def test_wrong_dtype_and_no_common_names_are_bad_input(tmp_path, capsys):
  t = load_file(str(KERNEL))
  np.savez(tmp_path / "a.npz", quantized=t["quantized"].astype(np.int16))
  np.savez(tmp_path / "b.npz", logits=np.zeros(3, np.float32))
  np.savez(tmp_path / "c.npz", dequantized=t["dequantized"].astype(np.float64))
  for name in ("a", "b", "c"):
    assert run_diff(KERNEL, tmp_path / f"{name}.npz")[0] == 2
  err = capsys.readouterr().err
  assert "must be uint8" in err and "no tensor to compare" in err and "must be float32" in err


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_truncated_candidate_is_bad_input(outputs_golden, tmp_path, capsys, fmt):
  t = load_file(str(outputs_golden))
  path = tmp_path / f"cand.{fmt}"
  if fmt == "npz":
    np.savez(path, **t)
  else:
    save_file(t, str(path))
  blob = path.read_bytes()
  path.write_bytes(blob[: len(blob) * 2 // 3])
  code, _ = run_diff(outputs_golden, path)
  err = capsys.readouterr().err
  assert code == 2 and str(path) in err and "Traceback" not in err


def test_unknown_threshold_and_file_type_are_bad_input(outputs_golden, tmp_path, capsys):
  np.save(tmp_path / "l.npy", load_file(str(outputs_golden))["logits"])
  assert run_diff(outputs_golden, tmp_path / "l.npy", "--threshold", "logit_kld=1")[0] == 2
  assert "unknown threshold 'logit_kld'" in capsys.readouterr().err
  assert run_diff(outputs_golden, tmp_path / "l.npy", "--threshold", "logits_mean_kld=abc")[0] == 2
  (tmp_path / "x.txt").write_text("hello, world")
  assert run_diff(outputs_golden, tmp_path / "x.txt")[0] == 2
  assert run_diff(outputs_golden, tmp_path / "missing.npz")[0] == 2
  err = capsys.readouterr().err
  assert "unknown file type" in err and "no such file" in err


def test_thresholds_table_is_one_frozen_dataclass():
  with pytest.raises(AttributeError):
    diff.PROFILES["float32"].logits_mean_kld = 1.0  # type: ignore[misc]
  assert set(diff.threshold_names()) >= {"intermediate_nmse", "logits_mean_kld", "logits_min_same_top_p"}


# --------------------------------------------------------------------------------------------------- GGUF


def _write_gguf(path, q8_bytes: np.ndarray, f32: np.ndarray) -> None:
  w = gguf.GGUFWriter(str(path), "deepseek2")
  w.add_block_count(1)
  w.add_tensor("blk.0.ffn_down.weight", q8_bytes, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
  w.add_tensor("blk.0.attn_norm.weight", f32)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_vs_gguf_names_the_tensor_and_block(tmp_path, capsys):
  rng = np.random.default_rng(0)
  q8 = rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8)  # 4 rows of 64 elements: 2 Q8_0 blocks each
  f32 = rng.standard_normal(64).astype(np.float32)
  _write_gguf(tmp_path / "golden.gguf", q8, f32)
  _write_gguf(tmp_path / "same.gguf", q8, f32)
  assert run_diff(tmp_path / "golden.gguf", tmp_path / "same.gguf")[0] == 0
  blob = bytearray((tmp_path / "same.gguf").read_bytes())
  entry = gguf_read.read_gguf(tmp_path / "same.gguf").tensors["blk.0.ffn_down.weight"]
  blob[entry.offset + 2 * 68 + 34 + 3] ^= 0x80  # row 2, block 1, byte 3 of the block
  (tmp_path / "cand.gguf").write_bytes(bytes(blob))
  code, rep = run_diff(tmp_path / "golden.gguf", tmp_path / "cand.gguf", tmp_path=tmp_path)
  rows = {r["name"]: r for r in rep["rows"]}
  assert code == 1 and rows["blk.0.attn_norm.weight"]["status"] == "PASS"
  bad = rows["blk.0.ffn_down.weight"]
  first = bad["metrics"]["first"]
  assert bad["status"] == "FAIL" and (first["row"], first["block"]) == (2, 1)
  assert first["bytes"][0]["offset_in_block"] == 3 and first["bytes"][0]["bits"] == [7]
  assert "blk.0.ffn_down.weight" in capsys.readouterr().out
  _write_gguf(tmp_path / "other.gguf", q8, f32[:32])
  code, rep = run_diff(tmp_path / "golden.gguf", tmp_path / "other.gguf", tmp_path=tmp_path)
  assert (
    code == 1
    and "candidate F32 [32]" in {r["name"]: r for r in rep["rows"]}["blk.0.attn_norm.weight"]["summary"]
  )
  np.save(tmp_path / "l.npy", f32)
  assert run_diff(tmp_path / "golden.gguf", tmp_path / "l.npy")[0] == 2


# ----------------------------------------------------------------------------------- real model goldens


def _model_outputs_goldens() -> list[str]:
  manifest = json.loads((GOLDENS / "manifest.json").read_text())
  return sorted(rel for rel, e in manifest["files"].items() if e.get("kind") == "model-outputs")


def test_real_model_goldens(tmp_path):
  outputs = [rel for rel in _model_outputs_goldens() if (GOLDENS / rel).exists()]
  assert outputs, "goldens/models/ is committed; regenerate it with `dq3jax goldens`"
  # dq3jax's own model on the golden GGUF, through the example writer, is within the strict bounds.
  rel = "models/v3-tiny/outputs/Q4_K_M.safetensors"
  assert rel in outputs
  assert dump_example.main([str(GOLDENS / rel), str(tmp_path / "cand.npz")]) == 0
  code, rep = run_diff(GOLDENS / rel, tmp_path / "cand.npz", tmp_path=tmp_path)
  assert code == 0, [r for r in rep["rows"] if r["status"] == "FAIL"]
  assert rep["profile"] == "float32" and rep["first_divergence"] is None
  # With every layer's residuals it is judged stage by stage too, on its own inputs: float32 against float64.
  stage = {r["name"]: r for r in rep["rows"] if r["name"].endswith("[stage]")}
  assert "blk.1.feed-forward [stage]" in stage and all(r["status"] == "PASS" for r in stage.values())
  # The golden GGUF against itself.
  gguf_rel = rep["golden"].get("gguf")
  assert gguf_rel and run_diff(GOLDENS / gguf_rel, GOLDENS / gguf_rel)[0] == 0


def test_a_one_percent_error_in_one_stage_is_found_there(tmp_path):
  # The golden's own tensors, with layer 2's MoE contribution made 1 % larger from token 5 on: stage-wise, only
  # blk.2.feed-forward departs, and the first divergence names it and the token.
  rel = "models/v3-tiny/outputs/Q4_K_M.safetensors"
  t = load_file(str(GOLDENS / rel))
  cand = {k: v.copy() for k, v in t.items()}
  delta = t["blk.2.hidden_after_mlp"] - t["blk.2.hidden_after_attn"]
  cand["blk.2.hidden_after_mlp"][5:] += 0.01 * delta[5:]
  np.savez(tmp_path / "c.npz", **cand)
  code, rep = run_diff(GOLDENS / rel, tmp_path / "c.npz", tmp_path=tmp_path)
  failed = [r["name"] for r in rep["rows"] if r["status"] == "FAIL"]
  assert code == 1 and "blk.2.feed-forward [stage]" in failed
  assert not [n for n in failed if n.startswith(("blk.0.", "blk.1."))], failed
  fd = rep["first_divergence"]
  assert (fd["layer"], fd["tensor"], fd["token"]) == (2, "blk.2.feed-forward [stage]", 5)


def test_which_stages_quantize_activations_follows_the_files_types():
  # The unquantized stage bound applies exactly where llama.cpp's CPU backend converts no activation: every
  # block of an F32 file, and the router (ffn_gate_inp stays F32 in every recipe); quantized blocks otherwise.
  from dq3jax.compare import stagewise  # noqa: PLC0415

  models = GOLDENS / "models" / "v3-pydoc" / "gguf"
  f32, q4 = models / "F32.gguf", models / "Q4_K_M.gguf"
  assert [stagewise.quantizes_activations(f32, i, b) for i in range(3) for b in ("attn", "mlp")] == [
    False
  ] * 6
  assert [stagewise.quantizes_activations(q4, i, b) for i in range(3) for b in ("attn", "mlp")] == [True] * 6
  assert [stagewise.quantizes_activations(q4, i, "mlp", "router") for i in (1, 2)] == [False, False]
  with pytest.raises(KeyError, match="no matmul weight under layers.0.mlp.router"):
    stagewise.quantizes_activations(q4, 0, "mlp", "router")  # layer 0 is dense: it has no router
