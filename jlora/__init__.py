"""jlora: LoRA for JAX as a pure transform on the parameter tree."""
