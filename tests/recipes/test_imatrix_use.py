"""When llama-quantize applies an importance matrix to a tensor (dq3jax.recipes.imatrix_use)."""

import pytest

from dq3jax.recipes.builtin import builtin_recipe
from dq3jax.recipes.imatrix_use import imatrix_use

EXPS = "blk.3.ffn_down_exps.weight"


def test_when_llama_quantize_applies_the_imatrix():
  r = builtin_recipe("Q4_K_M")
  ne = (2048, 7168, 256)
  use = imatrix_use(EXPS, ne, "BF16", "Q4_K", 2048 * 256, r)
  assert use.applies and not use.required
  assert not imatrix_use(EXPS, ne, "BF16", "Q8_0", 2048 * 256, r).applies  # Q8_0 ignores weights
  assert not imatrix_use(EXPS, ne, "BF16", "BF16", 2048 * 256, r).applies  # not quantized: copied
  assert not imatrix_use(EXPS, ne, "BF16", "Q4_K", None, r).applies
  assert imatrix_use(EXPS, ne, "BF16", "IQ4_NL", 2048 * 256, r).applies  # size-only type
  assert not imatrix_use("blk.3.ffn_gate_inp.weight", (7168, 256), "F32", "Q4_K", 7168, r).applies
  with pytest.raises(ValueError, match="different from tensor size"):
    imatrix_use(EXPS, ne, "BF16", "Q4_K", 2048, r)
  assert not imatrix_use("token_embd.weight", (7168, 129280), "BF16", "Q4_K", 5, r).applies
  q2s = builtin_recipe("Q2_K_S")
  assert imatrix_use("blk.9.ffn_up_exps.weight", (7168, 2048, 256), "BF16", "Q2_K", None, q2s).required
  assert not imatrix_use("token_embd.weight", (7168, 129280), "BF16", "Q2_K", None, q2s).required
