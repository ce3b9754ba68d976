"""Interop: the Hugging Face PEFT adapter format, Orbax adapter checkpoints and the reference
models (Llama family, BERT) with their safetensors loaders."""
