"""What each node's CPU can compute natively, and the precision every rank agrees to train in.

bf16 pays only where the CPU has bf16 instructions (AVX512_BF16, AMX). With AVX-512 but no bf16,
oneDNN emulates bf16 with fp32 instructions; without AVX-512 it has no bf16 kernels at all and the
process aborts in C++ at the first bf16 convolution. So the precision is decided from the CPU, by
the least capable node, before TensorFlow runs an op.

The ISA oneDNN may use is also capped by ONEDNN_MAX_CPU_ISA; a node capped below bf16 is treated as
a node without it. That is both a user's switch and how the tests make any CPU behave like an
older one. Pure Python, no TensorFlow: the preflight reads it in a fraction of a second.
"""
from __future__ import annotations

import os
import platform
import re
import socket

from .errors import SetupError

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA), in rising order; aliases share a level.
ONEDNN_ISA_LEVELS = {
    "SSE41": 1, "AVX": 2, "AVX2": 3, "AVX2_VNNI": 4, "AVX2_VNNI_2": 5,
    "AVX512_CORE": 6, "AVX512_CORE_VNNI": 7, "AVX512_CORE_BF16": 8,
    "AVX512_CORE_FP16": 9, "AVX10_1_512": 9,
    "AVX512_CORE_AMX": 10, "AVX10_1_512_AMX": 10,
    "AVX512_CORE_AMX_FP16": 11, "AVX10_1_512_AMX_FP16": 11,
    "ALL": 99, "DEFAULT": 99,
}
ISA_NAMES = {1: "SSE4.1", 2: "AVX", 3: "AVX2", 4: "AVX2", 5: "AVX2", 6: "AVX-512", 7: "AVX-512",
             8: "AVX-512 BF16", 9: "AVX-512 BF16", 10: "AMX", 11: "AMX"}
AVX512_LEVEL = ONEDNN_ISA_LEVELS["AVX512_CORE"]
NATIVE_BF16_LEVEL = ONEDNN_ISA_LEVELS["AVX512_CORE_BF16"]
ISA_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
RELEVANT_FLAGS = re.compile(r"^(avx2|fma|avx512f|avx512bw|avx512vl|avx512dq|avx512_bf16|avx512_vnni|avx_vnni|amx_\w+)$")

BF16_PRECISIONS = ("keras_bf16", "itex_bf16")


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The flags that matter for TensorFlow's CPU kernels (AVX2, AVX-512, bf16, AMX, VNNI)."""
    flags = (_cpuinfo_field("flags") or "").split()
    return sorted(f for f in set(flags) if RELEVANT_FLAGS.match(f))


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_level(flags: list[str]) -> int:
    """The oneDNN ISA level the CPU itself offers."""
    have = set(flags)
    if "amx_bf16" in have:
        return ONEDNN_ISA_LEVELS["AVX512_CORE_AMX"]
    if "avx512_bf16" in have:
        return NATIVE_BF16_LEVEL
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= have:   # oneDNN's AVX512_CORE
        return ONEDNN_ISA_LEVELS["AVX512_CORE_VNNI"] if "avx512_vnni" in have else AVX512_LEVEL
    if "avx2" in have:
        return ONEDNN_ISA_LEVELS["AVX2"]
    return ONEDNN_ISA_LEVELS["SSE41"]


def isa_cap(environ: dict[str, str] = os.environ) -> tuple[str | None, int]:
    """(the variable's setting, its level) of a ONEDNN_MAX_CPU_ISA cap; (None, 99) when unset."""
    for var in ISA_CAP_VARS:
        value = environ.get(var, "").strip()
        if value:
            level = ONEDNN_ISA_LEVELS.get(value.upper())
            if level is None:
                raise SetupError(f"{var}={value}: not a oneDNN ISA name; expected one of "
                                 f"{', '.join(ONEDNN_ISA_LEVELS)}")
            return f"{var}={value}", level
    return None, ONEDNN_ISA_LEVELS["ALL"]


def node_facts(environ: dict[str, str] = os.environ) -> dict:
    """This node's CPU as the precision decision sees it (JSON-able, gathered from every rank)."""
    flags = cpu_flags()
    cap, cap_level = isa_cap(environ)
    level = min(cpu_level(flags), cap_level)
    return {"host": socket.gethostname(), "cpu_model": cpu_model(), "flags": flags, "isa_cap": cap,
            "isa": ISA_NAMES.get(level, "older than SSE4.1"), "avx512": level >= AVX512_LEVEL,
            "native_bf16": level >= NATIVE_BF16_LEVEL}


def resolve_precision(requested: str, nodes: list[dict]) -> dict:
    """The precision every rank trains in, from every rank's node_facts; the least capable node
    decides. An explicit bf16 request on a node without native bf16 is a SetupError naming it."""
    lacking = _distinct_hosts(n for n in nodes if not n["native_bf16"])
    hosts = {n["host"]: n["isa"] for n in nodes}
    if requested in BF16_PRECISIONS and lacking:
        raise SetupError(
            f"intel.mixed_precision={requested} needs native bf16 (avx512_bf16 or amx_bf16) on every node; "
            + "; ".join(f"{n['host']} ({n['cpu_model']}) has {n['isa']}{_cap_note(n)}" for n in lacking)
            + ". Use intel.mixed_precision=auto (bf16 where every node has it, else fp32) or fp32")
    if requested == "auto":
        if lacking:
            chosen = "fp32"
            reason = ("not every node has native bf16: " + ", ".join(
                f"{n['host']} has {n['isa']}{_cap_note(n)}" for n in lacking))
        else:
            chosen = "keras_bf16"
            reason = "every node has native bf16 (" + ", ".join(sorted(set(hosts.values()))) + ")"
    else:
        chosen = requested
        reason = f"intel.mixed_precision={requested} (explicit)"
    return {"requested": requested, "chosen": chosen, "reason": reason, "hosts": hosts}


# intel.itex=auto: ITEX did not speed up fp32 training on AVX2 (0.97-1.00x) nor on AVX-512 without
# bf16 (0.70-1.00x, interleaved runs, docs/results.md), and emulated bf16 is no option there.
ITEX_AUTO_WHY = "ITEX pays only with native bf16; stock TensorFlow's oneDNN kernels do the work"


def itex_pays(node: dict) -> bool:
    """Whether intel.itex=auto loads ITEX on this node."""
    return node["native_bf16"]


def _distinct_hosts(nodes) -> list[dict]:
    seen: dict[str, dict] = {}
    for node in nodes:
        seen.setdefault(node["host"], node)
    return list(seen.values())


def _cap_note(node: dict) -> str:
    return f" under {node['isa_cap']}" if node.get("isa_cap") else ""
