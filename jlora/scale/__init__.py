"""Scale-out: sharding presets, specs and placement over a `jax.sharding.Mesh`, and the pmap /
sharded-jit train steps."""
