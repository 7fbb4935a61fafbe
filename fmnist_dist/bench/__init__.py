"""`fmnist-dist bench`: every speed option side by side, in one run, on this machine.

Each variant is a real training process (or `horovodrun -np 2` of them) started from
`bench/worker.py`, which runs the training code itself: `training.runtime` (environment before
TensorFlow, ITEX, Horovod, threads, precision), `data` (the real Fashion-MNIST and the rank's
shard), `training.pipeline` (the input pipeline) and `training.model.build_and_compile` (the model,
optimizer and schedule, exactly as training compiles them). A process trains `warmup` steps (graph tracing, oneDNN primitive
creation: excluded), waits at a barrier, then trains `steps` timed steps in one `fit` call.
images/s = images of all ranks / the slowest rank's wall-clock time of that `fit`, as the run
report counts it.

Noise on a shared machine: the variants run interleaved (rep 1: A B C ..., rep 2: A B C ..., ...),
so a slow minute hits one launch of every variant rather than all launches of one. Per variant the
median over repetitions and the spread ((max - min) / median); comparisons are medians of the
ratios of launches of the same repetition (neighbours in time). The load is recorded per launch:
the 1-minute load average at its start and the share of the cores other processes used during it
(/proc/stat busy time minus this benchmark's own CPU time).

Peak: a matmul probe (square float32 and bfloat16 matrices, all cores, one process) runs at the
start of every repetition; the best rate seen is the measured peak. Training FLOP/s = images/s x
the training FLOPs per image (`model.train_flops_per_image`: each conv and dense layer's forward
pass and the gradients a step computes, each as costly as the forward). A variant's fraction of the
peak is the median over repetitions of each launch's training FLOP/s against the best probe of its
own repetition, in the variant's precision: both from the same repetition rather than from
anywhere in the run, whose pace may drift.

Layers (`--layers`): where a step's time goes. One process per precision the CPU runs natively,
with one thread bound to one core (as each rank of the 2-rank default), times each layer alone, forward and backward
at the benchmark's batch, and the whole step the same way; a layer's GFLOP/s is compared with the
matmul peak of that one thread, measured in the same process.

Outputs: a table on stdout, OUT/bench.json (schema below), OUT/bench.md (Markdown tables, also
printed), OUT/logs/ (every launch's output).

bench.json (schema "fmnist-dist/bench", version 1): started, finished, command, quick, machine
{cpu_model, cores, flags, isa, isa_cap, native_bf16, avx512, amx (AMX kernels allowed: the CPU has them and no
ISA cap is below), avx512f, avx512_bf16}, config (base, resolved),
settings {reps, warmup_steps, steps, batch_size, variants}, model {description, parameters, flops_per_image,
train_flops_per_image}, load {before, waited_s, after, launches_other_cpu_median, ..._max},
peak {fp32_gflops, bf16_gflops (null without native bf16), samples [{rep, fp32 [..], bf16 [..]}], n} or null,
variants [{name, title, group, launcher, ranks, threads_per_rank, intel, command,
images_per_s [per rep, null if failed], median, min, max, spread, gflops, peak_fraction (median of
peak_fractions [per rep, against that rep's probe]),
vs_baseline, environment (of the first good launch)}], skipped [{name, reason}] (variants this CPU
cannot run), comparisons [{name, what, a, b, ratios
[per rep], median, min, max}], launches [{rep, variant, seconds, ok, images_per_s, load1,
other_cpu, log, error, ranks [{rank, threads, affinity, fit_s, steps}]}] in the order they ran,
layers [{batch, threads, cores, precision, policy, peak_gflops, whole_step_s, sum_of_layers_s,
flops_per_image, rows [{index, name, kind, input, output, flops_per_image, step_s, gflops}]}].
"""
