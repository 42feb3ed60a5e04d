"""A tiny, safe integer expression language for the `when` field of recipe rules.

Rules in recipe files are data, so their layer conditions are strings such as `"i < n // 16"` or
`"use_more_bits(i, n)"`. They are parsed with Python's `ast` and only the node kinds below are accepted:
integer literals, the variables a rule may see, `+ - * // %`, comparisons (chains allowed), `and`/`or`/`not`,
`True`/`False`, and calls to the functions in FUNCTIONS. Nothing else can be named or called.

`//` and `%` follow C semantics (truncate toward zero) because the llama.cpp rules they mirror are C++ integer
arithmetic; for the non-negative values recipes use, this equals Python's.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Mapping


def use_more_bits(i: int, n: int) -> bool:
  """llama.cpp's use_more_bits(i_layer, n_layers): first 1/8, last 1/8, and every third layer between."""
  return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


FUNCTIONS: dict[str, Callable[..., int | bool]] = {"use_more_bits": use_more_bits}

# Variables a rule can refer to; documented in docs/recipes.md and recipe_file.py.
VARIABLES = (
  "i",
  "n",
  "k",
  "m",
  "n_moe",
  "n_gqa",
  "n_expert",
  "ne0",
  "ne1",
  "ne2",
  "ffn_down_idx",
  "imatrix",
)


class ExprError(ValueError):
  pass


def _cdiv(a: int, b: int) -> int:
  if b == 0:
    raise ZeroDivisionError("division by zero in rule condition")
  q = abs(a) // abs(b)
  return q if (a >= 0) == (b >= 0) else -q


def _cmod(a: int, b: int) -> int:
  return a - b * _cdiv(a, b)


_BINOPS = {
  ast.Add: lambda a, b: a + b,
  ast.Sub: lambda a, b: a - b,
  ast.Mult: lambda a, b: a * b,
  ast.FloorDiv: _cdiv,
  ast.Mod: _cmod,
}
_CMPOPS = {
  ast.Lt: lambda a, b: a < b,
  ast.LtE: lambda a, b: a <= b,
  ast.Gt: lambda a, b: a > b,
  ast.GtE: lambda a, b: a >= b,
  ast.Eq: lambda a, b: a == b,
  ast.NotEq: lambda a, b: a != b,
}


class _Missing(Exception):
  """A variable the tensor does not have (e.g. `i` for token_embd): the rule does not match."""


def _check(node: ast.AST, src: str) -> None:
  for sub in ast.walk(node):
    ok = isinstance(
      sub,
      (
        ast.Expression,
        ast.BoolOp,
        ast.And,
        ast.Or,
        ast.UnaryOp,
        ast.Not,
        ast.USub,
        ast.BinOp,
        ast.Compare,
        ast.Name,
        ast.Load,
        ast.Call,
        ast.Constant,
        *_BINOPS,
        *_CMPOPS,
      ),
    )
    if isinstance(sub, ast.Constant) and not isinstance(sub.value, (bool, int)):
      ok = False
    if isinstance(sub, ast.Name) and sub.id not in VARIABLES and sub.id not in FUNCTIONS:
      raise ExprError(
        f"rule condition {src!r}: unknown name {sub.id!r}; known: {', '.join(VARIABLES)}, "
        f"{', '.join(FUNCTIONS)}"
      )
    if isinstance(sub, ast.Call) and (
      not isinstance(sub.func, ast.Name) or sub.func.id not in FUNCTIONS or sub.keywords
    ):
      ok = False
    if not ok:
      raise ExprError(f"rule condition {src!r}: {type(sub).__name__} is not allowed")


def _eval(node: ast.AST, env: Mapping[str, int | None]) -> int | bool:
  if isinstance(node, ast.Expression):
    return _eval(node.body, env)
  if isinstance(node, ast.Constant):
    return node.value
  if isinstance(node, ast.Name):
    v = env.get(node.id)
    if v is None:
      raise _Missing(node.id)
    return v
  if isinstance(node, ast.BoolOp):
    if isinstance(node.op, ast.And):
      return all(_eval(v, env) for v in node.values)
    return any(_eval(v, env) for v in node.values)
  if isinstance(node, ast.UnaryOp):
    v = _eval(node.operand, env)
    return (not v) if isinstance(node.op, ast.Not) else -v
  if isinstance(node, ast.BinOp):
    return _BINOPS[type(node.op)](_eval(node.left, env), _eval(node.right, env))
  if isinstance(node, ast.Compare):
    left = _eval(node.left, env)
    for op, right_node in zip(node.ops, node.comparators, strict=True):
      right = _eval(right_node, env)
      if not _CMPOPS[type(op)](left, right):
        return False
      left = right
    return True
  if isinstance(node, ast.Call):
    return FUNCTIONS[node.func.id](*(_eval(a, env) for a in node.args))
  raise ExprError(f"unsupported node {type(node).__name__}")  # unreachable after _check


@functools.lru_cache(maxsize=512)
def compile_condition(src: str) -> ast.Expression:
  """Parses and validates a condition; raises ExprError with the offending text."""
  try:
    tree = ast.parse(src.strip(), mode="eval")
  except SyntaxError as e:
    raise ExprError(f"rule condition {src!r}: {e.msg}") from None
  _check(tree, src)
  return tree


def evaluate(src: str, env: Mapping[str, int | None]) -> bool:
  """True when the condition holds; False when it refers to a variable this tensor lacks (e.g. no layer)."""
  tree = compile_condition(src)
  try:
    return bool(_eval(tree, env))
  except _Missing:
    return False
