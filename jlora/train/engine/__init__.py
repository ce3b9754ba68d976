"""The trainer's engine: set-up, the loop and its steps, phases, resume, guard, lock, compiles
and scale-out. It knows the `jlora.train.objectives.Objective` and `jlora.train.methods.Method`
protocols and never names an objective or a method (``tests/test_architecture.py`` checks its
imports). `jlora.train.engine.trainer.train` runs a config."""
