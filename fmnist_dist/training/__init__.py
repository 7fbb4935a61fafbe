"""The training job, one process per rank: runtime, model, input pipeline, callbacks, run directory, loop.

Modules that import TensorFlow at load time (model, optim, pipeline, callbacks) are imported only after
`runtime.start` has set the variables TensorFlow reads when it loads; see docs/architecture.md.
"""
