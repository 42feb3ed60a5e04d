"""Tensor inventory from a config (no weights)."""

import pytest

from dq3jax.recipes.inventory import dims_from_config, inventory, inventory_from_config


def test_r1_inventory_kv_b(r1_config):
  inv = {t.name: t for t in inventory_from_config(r1_config, layout="kv_b")}
  assert inv["token_embd.weight"].ne == (7168, 129280)
  assert inv["output.weight"].ne == (7168, 129280)
  assert inv["blk.0.attn_q_a.weight"].ne == (7168, 1536)
  assert inv["blk.0.attn_q_b.weight"].ne == (1536, 24576)
  assert inv["blk.0.attn_kv_a_mqa.weight"].ne == (7168, 576)
  assert inv["blk.0.attn_kv_b.weight"].ne == (512, 32768)
  assert inv["blk.0.attn_output.weight"].ne == (16384, 7168)
  assert inv["blk.2.ffn_down.weight"].ne == (18432, 7168)
  assert "blk.3.ffn_down.weight" not in inv
  assert inv["blk.3.ffn_gate_exps.weight"].ne == (7168, 2048, 256)
  assert inv["blk.60.ffn_down_exps.weight"].ne == (2048, 7168, 256)
  assert inv["blk.3.ffn_down_shexp.weight"].ne == (2048, 7168)
  assert (
    inv["blk.3.ffn_gate_inp.weight"].ne == (7168, 256) and inv["blk.3.ffn_gate_inp.weight"].src_type == "F32"
  )
  assert inv["blk.3.exp_probs_b.bias"].ne == (256,)
  assert "blk.61.attn_norm.weight" not in inv  # the MTP layer is not converted
  assert sum(t.name.endswith("ffn_down_exps.weight") for t in inv.values()) == 58
  assert round(sum(t.n_params for t in inv.values()) / 1e9, 2) == 671.03


def test_r1_inventory_split(r1_config):
  inv = {t.name: t for t in inventory_from_config(r1_config, layout="split")}
  assert "blk.0.attn_kv_b.weight" not in inv
  assert inv["blk.0.attn_k_b.weight"].ne == (128, 512, 128)
  assert inv["blk.0.attn_v_b.weight"].ne == (512, 128, 128)


def test_order_is_llama_loader_order(r1_config):
  names = [t.name for t in inventory_from_config(r1_config, layout="kv_b", layers=12)]
  assert names[:3] == ["output.weight", "output_norm.weight", "token_embd.weight"]
  layers = [int(n.split(".")[1]) for n in names[3:]]
  assert layers == sorted(layers)
  assert names.index("blk.2.attn_kv_b.weight") < names.index(
    "blk.10.attn_kv_b.weight"
  )  # numeric, not lexical


def test_truncation(r1_config):
  d = dims_from_config(r1_config, layers=2, experts=4)
  assert (d.n_layer, d.n_dense, d.n_expert) == (2, 2, 4)  # first_k_dense_replace clipped
  assert not any("exps" in t.name for t in inventory(d, "kv_b"))
  inv = {t.name: t for t in inventory_from_config(r1_config, layout="kv_b", layers=4, experts=4)}
  assert inv["blk.3.ffn_up_exps.weight"].ne == (7168, 2048, 4)
  assert inv["blk.3.ffn_gate_inp.weight"].ne == (7168, 4)
  with pytest.raises(ValueError, match="layers"):
    dims_from_config(r1_config, layers=62)
  with pytest.raises(ValueError, match="experts"):
    dims_from_config(r1_config, experts=0)


def test_v2_lite_no_q_lora(v2_lite_config):
  inv = {t.name: t for t in inventory_from_config(v2_lite_config, layout="kv_b")}
  assert inv["blk.0.attn_q.weight"].ne == (2048, 16 * 192)
  assert "blk.0.attn_q_a.weight" not in inv
  assert inv["blk.1.ffn_down_shexp.weight"].ne == (2816, 2048)
  assert round(sum(t.n_params for t in inv.values()) / 1e9, 2) == 15.71
