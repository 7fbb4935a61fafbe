"""Which MPI: the one Horovod was built against, and the one a launcher belongs to.

Horovod links one MPI library at build time (scripts/setup.sh, MPI=openmpi|mpich|intel); ranks
started by another MPI's launcher do not find each other (each comes up as rank 0 of 1, or hangs).
Open MPI's mpirun and the Hydra launcher of MPICH and Intel MPI take different options, so the launch
line depends on the family too. Everything here reads programs and libraries; nothing starts MPI.
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import subprocess
from dataclasses import dataclass

from .errors import LaunchError

NAMES = {"openmpi": "Open MPI", "mpich": "MPICH", "intel": "Intel MPI"}
HYDRA = ("mpich", "intel")      # the families launched by Hydra (mpiexec.hydra): -n, -ppn, -hosts, -genv


@dataclass(frozen=True)
class Mpi:
    family: str | None      # "openmpi", "mpich", "intel"; None: not recognised
    version: str            # the first line it gave about itself
    where: str              # the program or library it was read from

    @property
    def name(self) -> str:
        return NAMES.get(self.family or "", "an unrecognised MPI")

    def describe(self) -> str:
        return f"{self.name} ({self.version}; {self.where})"


def family_of(text: str) -> str | None:
    """The family from what an MPI says about itself: `mpirun --version` or MPI_Get_library_version.
    MPICH derivatives (MVAPICH, Cray MPICH) and plain Hydra count as MPICH."""
    if "Open MPI" in text or "OpenRTE" in text:
        return "openmpi"
    if "Intel(R) MPI" in text:
        return "intel"
    if "MPICH" in text or "HYDRA" in text or "MVAPICH" in text:
        return "mpich"
    return None


def short_name(text: str) -> str:
    """'Open MPI 4.1.4', 'MPICH 4.0.2', 'Intel MPI 2021.19.0' from what the library says of itself."""
    version = re.search(r"\d+\.\d+(?:\.\d+)?", text)
    return f"{NAMES.get(family_of(text) or '', 'MPI')} {version.group(0) if version else '?'}"


def launcher(program: str) -> Mpi:
    """The MPI an mpirun/mpiexec belongs to, from its --version."""
    try:
        proc = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"{program} --version failed: {e}") from None
    text = (proc.stdout + proc.stderr).strip()
    return Mpi(family_of(text), _first_line(text, "HYDRA build details", "Version:"), program)


def _first_line(text: str, *joined: str) -> str:
    """The line that names the version; Hydra's banner puts it on the line after 'HYDRA build details'."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no version output"
    if lines[0].startswith(joined[0]):
        version = next((line.split(":", 1)[1].strip() for line in lines if line.startswith(joined[1])), "")
        return f"Hydra {version}".strip()
    return lines[0]


def horovod_library(horovod_dir: str) -> str | None:
    """The MPI library Horovod's TensorFlow op library links, as the dynamic loader resolves it
    (Horovod built without MPI: None)."""
    libs = glob.glob(os.path.join(horovod_dir, "tensorflow", "mpi_lib*.so"))
    if not libs:
        return None
    try:
        out = subprocess.run(["ldd", libs[0]], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        m = re.match(r"\s*(libmpi(?:ch)?\.so\.\d+)\s*=>\s*(\S+)", line)
        if m:
            return os.path.realpath(m.group(2)) if m.group(2) != "not" else m.group(1)
    return None


def library(path: str) -> Mpi:
    """An MPI library's own word on what it is (MPI_Get_library_version may be called before MPI_Init)."""
    try:
        lib = ctypes.CDLL(path)
        buf, length = ctypes.create_string_buffer(8192), ctypes.c_int(0)
        lib.MPI_Get_library_version(buf, ctypes.byref(length))
        text = buf.value.decode(errors="replace")
    except (OSError, AttributeError) as e:
        return Mpi(None, f"cannot be loaded: {e}", path)
    first = next((" ".join(line.split()) for line in text.splitlines() if line.strip()), "")
    return Mpi(family_of(text), first[:80], path)


def horovod_build(horovod_dir: str) -> Mpi | None:
    """The MPI this Horovod was built against; None: built without MPI."""
    path = horovod_library(horovod_dir)
    return library(path) if path else None


def check_match(build: Mpi | None, launch: Mpi) -> None:
    """One line when the launcher cannot start ranks of this Horovod build."""
    if build is None or build.family is None or launch.family is None:
        return
    if build.family != launch.family:
        raise LaunchError(f"Horovod was built against {build.describe()}, but the launcher is "
                          f"{launch.describe()}: use that MPI's mpirun (put it first on PATH), or rebuild "
                          f"Horovod with MPI={launch.family} bash scripts/setup.sh")


def launched_by(environ: dict[str, str]) -> str | None:
    """Inside a rank: "openmpi" or "hydra" (MPICH's or Intel MPI's mpiexec), from the variables the
    launcher sets; None for srun and anything else."""
    if "OMPI_COMM_WORLD_SIZE" in environ:
        return "openmpi"
    if "PMI_RANK" in environ and "SLURM_STEP_ID" not in environ:
        return "hydra"
    return None


def check_rank(build: Mpi | None, environ: dict[str, str]) -> None:
    """In a rank, before MPI starts: a Horovod built against one MPI, started by another MPI's launcher."""
    started = launched_by(environ)
    if build is None or build.family is None or started is None:
        return
    if (started == "hydra") == (build.family in HYDRA):
        return
    by = "Open MPI's mpirun" if started == "openmpi" else "a Hydra mpiexec (MPICH's or Intel MPI's)"
    raise LaunchError(f"this rank was started by {by}, but Horovod was built against {build.describe()}: "
                      f"launch with {build.name}'s mpirun, or rebuild Horovod against the launcher's MPI "
                      f"(MPI=openmpi|mpich|intel bash scripts/setup.sh)")
