"""The run report's one definition: report.json (schema SCHEMA, version SCHEMA_VERSION) is a `Report`.

The training loop writes it, the summaries in report.py build parts of it, and render, plots,
tensorboard, compare and projection read it. tests/test_report_schema.py checks real reports
against it, both ways: a key written but not declared fails, and so does one declared but never
written. All times are seconds of wall-clock time; "training" excludes evaluation and start-up.
"""
# No `from __future__ import annotations` here: Python 3.11 reads NotRequired in a TypedDict only
# from annotations evaluated at class creation (in strings it counts the key as required).
from typing import Any, Literal, NotRequired, TypedDict

SCHEMA = "fmnist-dist/report"
SCHEMA_VERSION = 1


class Empty(TypedDict):
    """A section not written yet: {}."""


# -- where the run ran: environment, preflight, world ------------------------------------------

class ItexState(TypedDict):
    loaded: bool
    version: str | None
    reason: str                     # why not loaded ("" when loaded)


class NodeCpu(TypedDict):
    """One rank's CPU as the precision decision sees it (cpu.node_facts)."""
    host: str
    cpu_model: str
    flags: list[str]                # the flags that matter to TensorFlow's kernels
    isa_cap: str | None             # "ONEDNN_MAX_CPU_ISA=..." when capped
    isa: str
    avx512: bool
    native_bf16: bool


class PrecisionDecision(TypedDict):
    """cpu.resolve_precision: the least capable node decides."""
    requested: str                  # intel.mixed_precision
    chosen: str                     # fp32, keras_bf16 or itex_bf16
    reason: str
    hosts: dict[str, str]           # host -> its ISA


class Environment(TypedDict):
    """Detected at run time, not what was asked for (training.runtime.detect_environment)."""
    python: str
    tensorflow: str
    horovod: str
    horovod_controller: Literal["mpi", "gloo"]
    itex: ItexState
    onednn_enabled: bool
    mixed_precision_policy: str
    itex_auto_mixed_precision: bool
    intra_op_threads: int
    inter_op_threads: int
    omp_num_threads: str | None
    kmp_affinity: str | None
    kmp_blocktime: str | None
    bound_by: str
    cpu_model: str
    cpu_flags: list[str]
    precision: PrecisionDecision
    nodes: list[NodeCpu]            # one per rank
    node_cores: int
    affinity_cores: list[int]
    platform: str
    argv: list[str]


class Preflight(TypedDict):
    """RUN_DIR/preflight.json, when the job ran a preflight (fmnist_dist/preflight.py)."""
    checked: str
    ranks: list[dict[str, Any]]     # each rank's preflight.check_node record
    clock_offsets_s: list[float | None]
    clock_skew_s: float
    precision: PrecisionDecision | None
    problems: list[str]
    seconds: float


class WorldRank(TypedDict):
    rank: int
    host: str
    local_rank: int
    pid: int
    threads: int
    cpu_affinity: list[int]
    shard_size: int                 # training images per epoch
    epoch1_shard_sha256: str        # of the rank's epoch-1 training indices as int64
    initial_weights_sha256: str


class World(TypedDict):
    size: int
    hosts: dict[str, list[int]]     # host -> its ranks
    ranks: list[WorldRank]


class Segment(TypedDict):
    """One start or resume of the run."""
    segment: int
    started: str
    world_size: int
    hosts: list[str]
    resumed_from: str | None        # the checkpoint
    start_epoch: int
    start_position: int             # examples of the epoch already trained
    skipped_examples: int           # epoch remainders dropped after a resume on another world size
    start_step: int
    peak_lr: float
    precision: str
    training_s: float
    ended: str | None
    end: Literal["running", "completed", "preempted", "failed", "interrupted", "stalled"]
    config_changes: dict[str, list[Any]] | None     # --allow-change: {key: [before, after]}
    code_version: NotRequired[str]  # fmnist-dist version [+g<git commit>]; from the segment's first save
    checkpoint_code_version: NotRequired[str | None]    # on a resume: the version that wrote its checkpoint
    note: NotRequired[str]          # resumed on another world size
    reason: NotRequired[str]        # why it ended, when not completed


# -- data and scaling --------------------------------------------------------------------------

class Candidate(TypedDict):
    """A global batch train.global_batch_size=auto weighed (scaling.choose)."""
    global_batch: int
    per_rank: int                       # the batch each (real or simulated) rank normalizes over
    expected_accuracy: float | None     # None: outside the accuracy basis
    per_process: NotRequired[int]       # these two where each process carries simulated ranks of the
    simulated_world: NotRequired[int]   # basis's size: the ranks trained as
    epochs_to_target: int | None
    epochs: int | None
    epoch_s: NotRequired[float]         # these three for a candidate that reaches the target
    epochs_trained: NotRequired[int]
    projected_s: NotRequired[float]
    rejected: NotRequired[str]          # why not (absent on the one chosen)


class Choice(TypedDict):
    """train.global_batch_size=auto: the global batch taken, and why."""
    global_batch: int | None            # None: no basis, or it measured none of the candidates (weak scaling)
    mode: Literal["weak", "strong"]
    reason: str
    candidates: list[Candidate]
    short_of_target: NotRequired[bool]  # none reaches the target: the one expected closest to it
    simulated_world: NotRequired[int]   # the ranks the processes train as (train.simulate_world_size)
    network: NotRequired[str | list[float]]     # train.interconnect, or [latency s, bandwidth B/s]
    precision: NotRequired[str | None]          # the throughput curve used (fp32 or bf16)


class AccuracyBasis(TypedDict):
    """Where the global batch lies in the recipe's measured accuracy basis (basis.launch_check)."""
    basis: str | None                   # None: no basis measured for this recipe
    recipe: str | None
    target: float
    within: bool | None
    expected_accuracy: float | None
    epochs: int | None
    note: str | None
    warning: str | None


class Scaling(TypedDict):
    """The global batch's split (scaling.BatchPlan.describe) and its recipe (training.optim.recipe)."""
    mode: Literal["weak", "strong"]
    processes: int
    world_size: int                     # real or simulated ranks
    simulated: bool
    global_batch_size: int
    batch_size_per_rank: int
    batch_size_per_process: int
    lr_factor: float
    recipe: Literal["standard", "large-batch"]
    optimizer: str
    warmup_epochs: float
    choice: Choice | None               # None when train.global_batch_size is explicit
    accuracy_basis: AccuracyBasis


class Data(TypedDict):
    source: str
    train_size: int
    val_size: int
    test_size: int
    steps_per_epoch: int
    batch_size_per_rank: int            # of one rank, real or simulated
    global_batch_size: int
    scaling: Scaling


class Model(TypedDict):
    layers: list[dict[str, Any]]        # model.layers of the config
    description: str
    parameters: int
    trainable_parameters: int
    batch_norm: bool
    flops_per_image: int


# -- epochs and timing -------------------------------------------------------------------------

class EpochRank(TypedDict):
    """One rank's epoch (fit chunks added up); compute_s + comm_s + tracing_s = step_s."""
    rank: int
    host: str
    data_s: float
    step_s: float
    fit_s: float
    wait_s: float
    eval_s: float
    steps: int
    samples: int
    checkpoint_s: float
    compute_s: float
    comm_s: float
    comm_method: Literal["probe", "timeline", "single"]
    other_s: float                      # fit_s - step_s + tracing_s
    negotiate_s: NotRequired[float]     # timeline only
    # The step statistics and CPU use: absent for an epoch this segment trained none of.
    tracing_s: NotRequired[float]
    step_median_s: NotRequired[float]
    step_spread: NotRequired[float]
    cpu_s: NotRequired[float]
    cpu_wait_s: NotRequired[float]
    cpu_wait_share: NotRequired[float]
    loadavg: NotRequired[float]


class EpochMetrics(TypedDict):
    lr: float
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float


class Epoch(EpochMetrics):
    epoch: int
    training_s: float                   # the slowest rank's data + fit + wait
    evaluation_s: float
    images_per_s: float
    ranks: list[EpochRank]


class HostTiming(TypedDict):
    ranks: list[int]
    busy_s: float                       # its slowest rank's data + fit
    samples: int
    images_per_s: float


class TimingSummary(TypedDict):
    """timing_summary: totals over the epochs."""
    training_s: float
    evaluation_s: float
    time_to_target_s: float | None
    images_per_s: float
    images_per_s_per_rank: dict[str, float]     # rank -> rank_throughput over every epoch
    imbalance: float                    # the slowest rank's busy time over the mean, minus 1
    per_host: dict[str, HostTiming]


class Timing(TimingSummary):
    startup_s: float
    data_load_s: float
    total_s: float


class Results(TypedDict):
    val_accuracy: float
    val_loss: float
    test_accuracy: float
    test_loss: float
    test_correct: int
    test_total: int
    eval_flip: bool                     # logits averaged over each image and its mirror image
    test_accuracy_one_view: float       # the images alone; equals test_accuracy without eval_flip
    eval_shift: NotRequired[int]        # and each view moved by up to this many pixels (reports since 2026-12-04)
    target_accuracy: float | None
    target_reached_epoch: int | None
    stopped_early: str | None
    weights_sha256: str


# -- the time breakdown (fmnist_dist/timing) ---------------------------------------------------

class ProbeSize(TypedDict):
    bytes: int
    seconds: float


class ProbeFit(TypedDict):
    latency_s: float
    bandwidth_Bps: float
    r2: float
    model: str


class Probe(TypedDict):
    tensors: int
    gradient_bytes: int
    calls: int
    warmup: int
    ranks: int
    seconds_per_call: float
    seconds_per_call_ranks: dict[str, float]
    spread: float                       # interquartile range / median
    sizes: list[ProbeSize]
    fit: ProbeFit | None
    probe_s: float
    skipped: NotRequired[str]           # 1 rank only


class TimelineFiles(TypedDict):
    mode: Literal["per-epoch", "whole-run"]
    files: list[str]


class RankTotals(TypedDict):
    """Seconds per rank and category, summed over epochs (start-up once)."""
    rank: int
    host: str
    startup_s: float
    data_s: float
    compute_s: float
    comm_s: float
    wait_s: float
    other_s: float
    eval_s: float
    checkpoint_s: float
    total_s: float
    steps: int
    samples: int


class Breakdown(TypedDict):
    method: Literal["probe", "timeline", "single", "mixed"]
    method_detail: str
    timeline: TimelineFiles | None
    categories: list[str]
    probe: Probe
    ranks: list[RankTotals]


# -- the report --------------------------------------------------------------------------------

class Failure(TypedDict):
    """Where the training loss first became NaN or infinite."""
    reason: str
    epoch: int
    step: int                           # of the epoch
    run_step: int
    loss: str                           # "nan", "inf"
    rank: int


class Report(TypedDict):
    schema: str                         # SCHEMA
    schema_version: int                 # SCHEMA_VERSION
    run_id: str
    status: Literal["running", "completed", "failed", "preempted"]
    error: str | None
    started: str
    finished: str | None
    config: dict[str, Any]              # fully resolved (fmnist_dist/config.py)
    environment: Environment
    preflight: Preflight | None
    world: World
    segments: list[Segment]
    data: Data
    model: Model
    epochs: list[Epoch]
    timing: Timing | Empty              # {} until the first epoch ends
    results: Results | Empty            # {} until the run completes
    breakdown: NotRequired[Breakdown]   # from the first epoch's end
    failure: NotRequired[Failure]       # the training loss became NaN or infinite
    stopped: NotRequired[str]           # why a preempted run stopped (signal, time limit)
