"""Pure-function JAX DeepSeek-V3/R1 forward pass over nested-dict parameter pytrees."""
