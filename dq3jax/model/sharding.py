"""Placing parameters on a `jax.sharding.Mesh`: routed experts split over one mesh axis, the rest replicated.

The forward pass itself is unchanged; XLA partitions the expert einsums and inserts the reduction over the
expert axis. Only the summation order over experts can differ from a single device.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dq3jax.model.config import DeepseekV3Config


def shard_params(params: dict, cfg: DeepseekV3Config, mesh: Mesh, axis: str | None = None) -> dict:
  """device_put params onto `mesh`, routed expert weights split along `axis` (default: the mesh's first)."""
  axis = axis or mesh.axis_names[0]
  n = mesh.shape[axis]
  if cfg.n_routed_experts % n:
    raise ValueError(
      f"n_routed_experts={cfg.n_routed_experts} is not divisible by mesh axis {axis!r} of size {n}"
    )
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec(axis))
  out = jax.device_put({k: v for k, v in params.items() if k != "layers"}, replicated)
  layers = []
  for i, lp in enumerate(params["layers"]):
    placed = jax.device_put({k: v for k, v in lp.items() if k != "mlp"}, replicated)
    if cfg.is_moe_layer(i):
      mlp = jax.device_put({k: v for k, v in lp["mlp"].items() if k != "experts"}, replicated)
      mlp["experts"] = jax.device_put(lp["mlp"]["experts"], split)
    else:
      mlp = jax.device_put(lp["mlp"], replicated)
    placed["mlp"] = mlp
    layers.append(placed)
  out["layers"] = layers
  return out
