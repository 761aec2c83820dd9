"""Failed systemd units, from systemd itself: one subject per unit.

Each sample asks the system manager for the units in the ``failed`` state (every unit,
or those matching the ``units`` names and globs), with ``systemctl list-units --failed
--output=json``, then ``systemctl show`` for why (Result, restarts). A failed unit is an
anomaly of its own subject (the unit's name), so a playbook can restart exactly that
unit (``unit = "{subject}"``). A unit seen failed and no longer failed is reported normal
for a while (:data:`KEEP_NORMAL` samples), long enough for its mission to resolve, then
forgotten. Unit names come from systemd, but are still bounded before use.
"""

from __future__ import annotations

import json
import re
import subprocess

from ..config import DetectorConfig
from .base import Observation

KEEP_NORMAL = 30  # samples a recovered unit is still reported normal
MAX_UNITS = 200  # failed units reported per sample
MAX_TRACKED = 1000
MAX_NAME = 256
SYSTEMCTL = "/usr/bin/systemctl"  # never through PATH
# A unit name as systemd writes one (unit_name_is_valid): letters, digits and :-_.\, one
# @ before an instance, a type suffix. Anything else ("*", "--force", "../../etc/passwd")
# is not a unit systemd listed, and never becomes a subject a playbook could act on.
_UNIT = re.compile(r"[A-Za-z0-9:_\\-][A-Za-z0-9:_.\\-]*(@[A-Za-z0-9:_.\\@-]*)?\."
                   r"(service|socket|target|device|mount|automount|swap|timer|path|slice|scope)")


def unit_name(name: str) -> bool:
    """Whether ``name`` is a valid systemd unit name (at most 255 characters)."""
    return len(name) <= 255 and _UNIT.fullmatch(name) is not None


def parse_units(stdout: bytes) -> dict[str, dict[str, str]]:
    """``systemctl list-units --output=json`` -> unit name -> its fields (bounded)."""
    try:
        rows = json.loads(stdout.decode("utf-8", "replace") or "[]")
    except ValueError as exc:
        raise RuntimeError(f"systemctl printed no JSON: {exc}") from None
    if not isinstance(rows, list):
        raise RuntimeError("systemctl printed JSON that is not a list of units")
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("unit"), str) \
                or not unit_name(row["unit"]):
            continue
        name = row["unit"]
        out[name] = {k: str(row.get(k, ""))[:200] for k in ("load", "active", "sub",
                                                            "description")}
    return out


def parse_show(stdout: bytes) -> dict[str, dict[str, str]]:
    """``systemctl show -p Id,Result,NRestarts`` of several units -> Id -> properties."""
    out: dict[str, dict[str, str]] = {}
    for block in stdout.decode("utf-8", "replace").split("\n\n"):
        props = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
        if props.get("Id") and unit_name(props["Id"]):
            out[props["Id"][:MAX_NAME]] = {k: v[:100] for k, v in props.items()}
    return out


class FailedUnits:
    """Value per unit: 1 while it is failed, 0 once it is not."""

    # systemd announces a unit's state only on D-Bus; what the file system shows is no
    # substitute (/run/systemd/units/ marks a unit's start, not its failure; a cgroup's
    # cgroup.events says its processes ended before systemd has judged the unit).
    mode_note = ("systemd announces unit state changes only on D-Bus, which graced does "
                 "not speak: systemctl is asked every interval")

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.recovering: dict[str, int] = {}

    def close(self) -> None:
        pass

    def _systemctl(self, *args: str) -> bytes:
        res = subprocess.run([SYSTEMCTL, "--no-pager", *args], capture_output=True,
                             timeout=self.config.timeout, stdin=subprocess.DEVNULL,
                             check=False)
        if res.returncode != 0:
            raise RuntimeError("systemctl: " + res.stderr.decode(errors="replace").strip()[:200])
        return res.stdout

    def sample(self) -> list[Observation]:
        failed = parse_units(self._systemctl(
            "list-units", "--failed", "--all", "--plain", "--output=json", "--",
            *self.config.units))
        names = sorted(failed)[:MAX_UNITS]
        why = parse_show(self._systemctl(
            "show", "-p", "Id,Result,NRestarts,ExecMainStatus", "--", *names)) if names else {}
        out = []
        for name in names:
            info, props = failed[name], why.get(name, {})
            result = props.get("Result", "")
            status = props.get("ExecMainStatus", "")
            reason = f"{info['sub'] or 'failed'}" + (f" ({result}" + (
                f", exit status {status}" if status not in ("", "0") else "") + ")"
                if result and result != "success" else "")
            desc = f": {info['description']}" if info["description"] not in ("", name) else ""
            out.append(Observation(name, 1.0, "failed", failed=f"{reason}{desc}", detail={
                "active": info["active"], "sub": info["sub"], "result": result,
                "exit_status": status, "restarts": props.get("NRestarts", "")}))
            self.recovering[name] = KEEP_NORMAL
        for name in list(self.recovering):
            if name in failed:
                continue
            out.append(Observation(name, 0.0, "failed"))
            self.recovering[name] -= 1
            if self.recovering[name] <= 0:
                del self.recovering[name]
        while len(self.recovering) > MAX_TRACKED:
            del self.recovering[next(iter(self.recovering))]
        return out

