"""The core layer: config, target selection, the adapter-node protocol, the fused interpreter,
merge and the optimizer labels. It imports nothing from the layers above it."""
