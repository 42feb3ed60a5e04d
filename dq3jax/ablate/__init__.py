"""`dq3jax ablate`: accuracy of quantization recipes on (truncated) models, without writing GGUF files.

  roundtrip.quantized_params(source, recipe) -> (params as llama.cpp computes with them, per-tensor info)
  run.run(AblationSpec(...)) -> AblationResult (per recipe llama-perplexity statistics, bpw, size, timings)
  sensitivity               one tensor class at a time at a low type: which class costs most
  report                    Markdown, JSON and PNG of an AblationResult

Submodules are not imported here, so `import dq3jax.ablate` stays light (jax loads with `run`).
"""
