"""The benchmark's tables: text for the terminal, Markdown for bench.md and the docs."""
from __future__ import annotations

from ..tables import table
from .stats import NOT_AS_NAMED


def _f(x, fmt: str = "{:.0f}", none: str = "—") -> str:
    return none if x is None else fmt.format(x)


def _load_line(result: dict) -> str:
    load = result["load"]
    before = " ".join(f"{x:.2f}" for x in load["before"])
    line = f"load average before the run {before} (1/5/15 min)"
    if (load.get("waited_s") or 0) >= 1:
        line += f" after waiting {load['waited_s']:.0f} s"
    if load.get("launches_other_cpu_median") is not None:
        line += (f"; other processes used {100 * load['launches_other_cpu_median']:.0f}% of the cores during "
                 f"the median launch (max {100 * load['launches_other_cpu_max']:.0f}%)")
    return line


def _peak_line(result: dict) -> str:
    peak, model = result["peak"], result["model"]
    parts = []
    if peak:
        parts.append(f"matmul peak (best of {sum(len(s['fp32']) for s in peak['samples'])} probes, "
                     f"{peak['n']}x{peak['n']}, 2 threads): fp32 {peak['fp32_gflops']:.0f} GFLOP/s, "
                     + (f"bf16 {peak['bf16_gflops']:.0f} GFLOP/s" if peak["bf16_gflops"] else "bf16 not measured "
                        "(no native bf16)")
                     + "; each repetition's best: " + "; ".join(
                         f"{key} " + ", ".join(f"{max(s[key]):.0f}" for s in peak["samples"] if s.get(key))
                         for key in ("fp32", "bf16") if any(s.get(key) for s in peak["samples"])))
    if model:
        parts.append(f"model {model['description']}: {model['flops_per_image'] / 1e6:.2f} MFLOP/image forward, "
                     f"training {model['train_flops_per_image'] / 1e6:.1f} MFLOP/image (forward, and the gradients "
                     "computed: no input gradient before the first trained layer, no weight gradient for frozen ones)")
    return "; ".join(parts)


def machine_line(m: dict) -> str:
    """The CPU as the kernels see it: the ISA oneDNN may use (after any ONEDNN_MAX_CPU_ISA cap)."""
    cap = f" ({m['isa_cap']})" if m.get("isa_cap") else ""
    return (f"{m['cpu_model']}, {m['cores']} cores, ISA {m['isa']}{cap}, native bf16 "
            f"{'yes' if m['native_bf16'] else 'no'}, AMX {'yes' if m['amx'] else 'no'}")


def text_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"fmnist-dist bench on {result['host']}: {machine_line(m)}",
             f"batch {result['settings']['batch_size']}/rank, {result['settings']['reps']} interleaved repetitions, "
             f"{result['settings']['warmup_steps']} warm-up + {result['settings']['steps']} timed steps per launch",
             _load_line(result), _peak_line(result), ""]
    head = (f"{'variant':24s} {'ranks':>5s} {'precision':>15s} {'images/s':>9s} {'spread':>7s} {'vs base':>8s} "
            f"{'GFLOP/s':>8s} {'of peak':>8s}")
    lines += [head, "-" * len(head)]
    for v in result["variants"]:
        lines.append(f"{v['name']:24s} {v['ranks']}x{v['threads_per_rank']:<3d} {v['precision']:>15s} "
                     f"{_f(v['median']):>9s} {_f(v['spread'], '{:.0%}'):>7s} {_f(v['vs_baseline'], '{:.2f}x'):>8s} "
                     f"{_f(v['gflops']):>8s} {_f(v['peak_fraction'], '{:.0%}'):>8s}")
    lines += [f"{v['name']:24s} skipped: {v['reason']}" for v in result.get("skipped", [])]
    lines += [f"{la['variant']:24s} rep {la['rep']} not counted: {la['error']}" for la in _not_as_named(result)]
    if result["comparisons"]:
        lines += ["", f"{'comparison (same repetition, A/B)':40s} {'median':>7s} {'min':>6s} {'max':>6s}"]
        for c in result["comparisons"]:
            lines.append(f"{c['name']:40s} {_f(c['median'], '{:.2f}x'):>7s} {_f(c['min'], '{:.2f}'):>6s} "
                         f"{_f(c['max'], '{:.2f}'):>6s}")
    return "\n".join(lines)


def _not_as_named(result: dict) -> list[dict]:
    """The launches that did not run as their variant names (stats.count_if_ran_as_named)."""
    return [la for la in result.get("launches", []) if la.get("ran_as_named") is False]


def _itex_and_onednn(v: dict) -> tuple[str, str]:
    """ITEX and oneDNN as the variant's counted launches had them (what TensorFlow executed; else
    what ITEX's loader and the variable reported), or as named when none ran."""
    env = v.get("environment") or {}
    effect = env.get("in_effect")
    if effect:
        return ("on" if effect["itex"] else "off"), ("on" if effect["onednn"] else "off")
    if env:
        return ("on" if (env.get("itex") or {}).get("loaded") else "off"), ("on" if env.get("onednn_enabled") else "off")
    return v["intel"].get("itex", "?"), ("on" if v["intel"].get("onednn") else "off")


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"Benchmark (`python -m fmnist_dist bench{' --quick' if result['quick'] else ''}`), {result['started']}: "
             f"{machine_line(m)}. "
             f"Batch {s['batch_size']} per rank; {s['reps']} interleaved repetitions of {s['warmup_steps']} "
             f"warm-up (excluded) + {s['steps']} timed steps per launch; median images/s, spread = "
             f"(max - min) / median. {_load_line(result)}.", "",
             ]
    rows = []
    for v in result["variants"]:
        itex, onednn = _itex_and_onednn(v)
        rows.append([f"{v['title']} (`{v['name']}`)", f"{v['ranks']} x {v['threads_per_rank']}", v["precision"], itex,
                     onednn, _f(v["median"]), _f(v["spread"], "{:.0%}"), _f(v["vs_baseline"], "{:.2f}x"),
                     _f(v["gflops"]), f"{_f(v['peak_fraction'], '{:.0%}')} "
                     f"{v['peak_used'] if v['peak_fraction'] is not None else ''}".rstrip()])
    lines += table(["variant", "ranks x threads", "precision", "ITEX", "oneDNN", "images/s (median)", "spread",
                    "vs baseline", "GFLOP/s", "of peak"], rows, "md", left=5)
    if _not_as_named(result):
        lines += ["", "Not counted, as they did not run as named: " + "; ".join(
            f"rep {la['rep']} `{la['variant']}` ({la['error'].removeprefix(NOT_AS_NAMED)})"
            for la in _not_as_named(result)) + "."]
    if result.get("skipped"):
        lines += ["", "Skipped on this CPU: " + "; ".join(f"`{v['name']}` ({v['reason']})" for v in result["skipped"]) + "."]
    if result["comparisons"]:
        lines += [""] + table(["comparison (launches of the same repetition)", "A / B, median", "min", "max"],
                              [[f"{c['name']}: {c['what']}", _f(c["median"], "{:.2f}x"), _f(c["min"], "{:.2f}"),
                                _f(c["max"], "{:.2f}")] for c in result["comparisons"]], "md")
    peak = _peak_line(result)
    if peak:
        lines += ["", peak + ". GFLOP/s = images/s x training FLOPs per image; \"of peak\" is the median over "
                  "repetitions of each launch's GFLOP/s against the best probe of its own repetition, in the "
                  "variant's precision."]
    for profile in result.get("layers") or []:
        lines += ["", layers_markdown(profile)]
    return "\n".join(lines)


def layers_markdown(p: dict) -> str:
    """One precision's layer profile: each layer's share of the step and its fraction of the peak."""
    total = p["sum_of_layers_s"]
    whole_gflops = p["train_flops_per_image"] * p["batch"] / p["whole_step_s"] / 1e9
    lines = [f"Layer profile, {p['precision']} ({p['policy']}), {p['threads']} thread, batch {p['batch']}: each layer "
             f"alone, forward and backward, median of 3 rounds (best of the calls in each). Whole step "
             f"{1e3 * p['whole_step_s']:.1f} ms ({whole_gflops:.1f} GFLOP/s, "
             f"{whole_gflops / p['peak_gflops']:.0%} of this thread's {p['precision']} matmul peak of "
             f"{p['peak_gflops']:.0f} GFLOP/s); the layers alone add up to {1e3 * total:.1f} ms.", "",
             ]
    rows = []
    for r in p["rows"]:
        shape = f"{'x'.join(map(str, r['input']))} → {'x'.join(map(str, r['output']))}"
        fraction = None if r["gflops"] is None else r["gflops"] / p["peak_gflops"]
        rows.append([r["name"], shape, _f(r["flops_per_image"] / 1e6 or None, "{:.2f}"), f"{1e3 * r['step_s']:.2f}",
                     f"{r['step_s'] / total:.0%}", _f(r["gflops"], "{:.1f}"), _f(fraction, "{:.0%}")])
    return "\n".join(lines + table(["layer", "input → output", "forward MFLOP/image", "ms per step", "share",
                                     "GFLOP/s", "of peak"], rows, "md", left=2))
