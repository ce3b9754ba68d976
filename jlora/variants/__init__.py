"""LoRA variants, each a node type (or an init) that plugs into the core through the protocol of
`jlora.core.node`: DoRA, quantized bases (QLoRA), decomposition inits (PiSSA / OLoRA),
multi-adapter sets and mixed batches, LoRA-FA. Variants import only the core."""
