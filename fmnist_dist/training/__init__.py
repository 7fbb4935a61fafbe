"""The training job, one process per rank: runtime, model, input pipeline, callbacks, run directory, loop.

Modules that import TensorFlow at load time (runtime, model, optim, pipeline, callbacks, loop) are
imported only after `environment.prepare` (fmnist_dist/environment.py) has set the variables
TensorFlow reads when it loads; see docs/architecture.md.
"""
