"""Where the time went: compute vs communication per epoch and rank, start-up, and the allreduce probe.

Two methods split the time a rank spends inside training steps (`step_s`) into compute and
communication; the report says which one produced each number (`breakdown.method`, and
`comm_method` in every per-epoch rank record):

* **probe** (always available, cheap): at start-up every rank runs a short allreduce probe, a
  `tf.function` doing one grouped allreduce of zero tensors shaped like the model's trainable
  variables (what `DistributedOptimizer` allreduces every step), timed over PROBE_CALLS calls after
  PROBE_WARMUP warm-up calls. Communication per epoch is estimated as steps x the probe's median
  time per call, compute = step_s - comm. It measures one fused allreduce on otherwise idle ranks;
  in training the gradients become ready at different times during back-propagation and are
  reduced in several rounds while compute competes for the cores, so the probe is a lower bound
  for the communication cost (on this project's 2-core test machine the timeline measured about
  5x the probe; see docs/reports.md). The same probe times single tensors of PROBE_SIZES
  bytes (eager calls) and fits seconds = latency + bytes / bandwidth (used by
  `fmnist_dist.projection`).
* **timeline** (`report.timeline: true`, or HOROVOD_TIMELINE set by the launcher): Horovod's own
  timeline records every collective; communication per epoch is the measured union of the time the
  collectives (ALLREDUCE, ALLGATHER, BROADCAST, ...) were running during that epoch's `fit`, after
  negotiation (negotiation = waiting until every rank submitted the tensor is reported separately
  as `negotiate_s`). With `report.timeline` fmnist-dist sets HOROVOD_TIMELINE=DYNAMIC before
  Horovod starts and records one file per epoch, RUN_DIR/timeline/epoch-NNN.json; when the launcher
  set HOROVOD_TIMELINE to a file, that file (the whole run) is read at the end of every epoch and
  split by the epochs' wall-clock windows. An epoch trained in several `fit` calls (chunks between
  stop checks or checkpoints) gets one file per chunk, epoch-NNN-K.json. The timeline is written by rank 0 (Horovod's
  coordinator); a collective runs on all ranks at once, so its time is attributed to every rank.

With one rank, Horovod's optimizer does no allreduce at all: communication is 0, compute = step_s.

Every per-epoch rank record gets compute_s, comm_s, comm_method, other_s (framework overhead:
fit_s - step_s, the part of Keras `fit` outside steps — callbacks, iterator set-up — plus
tracing_s, the first step's excess over the median step when it is over 3x the median: graph
tracing and optimisation), step_median_s and step_spread (interquartile range / median of the
rank's step times), cpu_s / cpu_wait_s (thread-seconds the rank's threads ran / were runnable
but waited for a core during fit, from /proc/self/task/*/schedstat), cpu_wait_share
(= cpu_wait_s / (cpu_s + cpu_wait_s): how oversubscribed the node was), loadavg (1-minute load at
the end of fit) and checkpoint_s (the training loop adds the end-of-epoch checkpoint write to rank
0's record; 0.0 on the other ranks).
compute_s + comm_s + tracing_s = step_s. See reporting/schema.py for the schema.
"""
