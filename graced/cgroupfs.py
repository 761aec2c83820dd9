"""cgroup v2 paths: where cgroup2 is mounted on this host, and what a cgroup directory a
detector names lacks, in plain words. ``graced config check`` warns with them, and the
cgroup detectors (cgroup_memory, psi_*) fail with them (review of #19: a raw
FileNotFoundError, and paths outside cgroupfs or with ``..`` accepted silently).

graced watches cgroup v2 only. On a unified host it is mounted at /sys/fs/cgroup; on a
hybrid one (v1 controllers, v2 beside them) at /sys/fs/cgroup/unified, where controllers
the v1 hierarchy holds (memory, usually) give no memory.events; on a v1-only host there is
no cgroup2 mount at all."""

from __future__ import annotations

import os

MOUNTS = "/proc/self/mounts"

WHY_MISSING = {
    "memory.events": "the memory controller is not enabled for this cgroup (on cgroup v2, "
                     "+memory in its parent's cgroup.subtree_control; on a hybrid host "
                     "the v1 hierarchy holds it)",
    "pressure": "this kernel gives no pressure stall information for cgroups (CONFIG_PSI, "
                "psi=1 on its command line) or this is not a cgroup v2 directory",
}


def cgroup2_mounts(mounts: str = MOUNTS) -> list[str]:
    """Where cgroup2 is mounted (``/proc/self/mounts``), in the order listed."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as fh:
            text = fh.read(1 << 20)
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            found.append(fields[1].replace("\\040", " "))
    return found


def cgroup2_root() -> str:
    """The cgroup v2 hierarchy's root here: /sys/fs/cgroup on a unified host,
    /sys/fs/cgroup/unified on a hybrid one."""
    mounts = cgroup2_mounts()
    for usual in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if usual in mounts:
            return usual
    return mounts[0] if mounts else "/sys/fs/cgroup"


def missing(directory: str, filename: str) -> str:
    """Why ``filename`` cannot be read in the cgroup ``directory`` (it is not there)."""
    if not os.path.isdir(directory):
        return f"cgroup {directory} does not exist (yet)"
    why = WHY_MISSING["pressure" if filename.endswith(".pressure") else filename]
    return f"no {filename} in {directory}: {why}"


def problems(directory: str, filename: str) -> list[str]:
    """What is wrong with watching ``filename`` in ``directory`` here, if anything: a path
    that is not normalised (``..``), one outside every cgroup2 mount, or a missing file."""
    found = []
    norm = os.path.normpath(directory)
    if norm != directory.rstrip("/"):
        found.append(f"{directory} is not a plain path (it means {norm})")
    mounts = cgroup2_mounts()
    if not any(norm == m or norm.startswith(m.rstrip("/") + "/") for m in mounts):
        where = ", ".join(mounts) if mounts else "none on this host: cgroup v1 only"
        found.append(f"{norm} is not under a cgroup v2 mount ({where})")
    if not os.path.exists(os.path.join(norm, filename)):
        found.append(missing(norm, filename) + ": the detector fails until it is there")
    return found


class CgroupFileMissing(OSError):
    """A cgroup file a detector needs is not there; its message says why, plainly."""

    def __init__(self, directory: str, filename: str) -> None:
        super().__init__(missing(directory, filename))
