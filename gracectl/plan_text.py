"""Plans (what a playbook would run for a mission) as terminal text, escaped."""

from __future__ import annotations

import json
from typing import Any

from .out import safe, value  # plans carry monitored data (a subject, a process name)


def render_plan(plan: dict[str, Any]) -> list[str]:
    """A plan (graced/plan.py) as lines: each step exactly as it would run."""
    lines = [f"plan: playbook {safe(plan['playbook'])} (risk {safe(plan['risk'])}), "
             f"sha256 {safe(plan['sha256'])}"]
    for st in plan["steps"]:
        head = f"  {st['step']}. {safe(st['action'])}"
        if st["action"] == "run":
            lines.append(f"{head}: argv {json.dumps(st['argv'])}"
                         + (f" in {safe(st['cwd'])}" if st.get("cwd") else ""))
            extra = {k: v for k, v in (st.get("env") or {}).items()
                     if not k.startswith("GRACE_")}
            if extra:
                # graced never sends a value the config sets: only a hash of it.
                lines.append("       env " + ", ".join(
                    f"{safe(k)} (value hidden, {safe(v)})" for k, v in extra.items()))
        elif st["action"] in ("restart_unit", "start_action"):
            lines.append(f"{head}: unit {safe(st['unit'])} (argv {json.dumps(st['argv'])})")
        else:
            by_pid = st.get("pid") or st.get("pid_file")
            target = (f"pid {st['pid']}" if st.get("pid") else
                      f"the pid in {safe(st['pid_file'])}" if st.get("pid_file") else
                      f"processes named {json.dumps(st['process'])} or with it anywhere "
                      "in their command line (a wrapper's too)"
                      if st.get("match_cmdline") else
                      f"processes named {json.dumps(st['process'])}")
            whose = (f" of {user_text(st)}" if st.get("user") else
                     " of root, a system or service user or graced's (never a login "
                     "user's)" if by_pid else
                     " of root, a system or service user or graced's (never a login user)")
            lines.append(f"{head}: signal SIG{safe(st['signal'])} to {target}{whose}")
            if "matching_pids" in st:
                pids = ", ".join(safe(p) for p in st["matching_pids"]) or "none"
                lines.append(f"       targets now: {pids}"
                             + (f" ({safe(st['error'])})" if st.get("error") else ""))
                lines.extend(skipped_lines(st))
        lines.append(f"       timeout {st['timeout']:g} s")
    values = plan.get("values") or {}
    if values:
        lines.append("  values: " + " ".join(json.dumps(f"{{{k}}}={v}")
                                             for k, v in values.items()))
    return lines


def user_text(st: dict[str, Any]) -> str:
    """A signal step's ``user`` as shown: "user rev9nu (1010)" when graced's host names
    the uid it was given, "uid 1011" for a uid it does not name (a number is always a
    uid: graced refuses at load a number that is also a user's name), else "user NAME"."""
    user = str(st["user"])
    if st.get("user_name"):
        return f"user {safe(st['user_name'])} ({safe(user)})"
    return f"uid {user}" if user.isascii() and user.isdigit() else f"user {safe(user)}"


def signal_target(st: dict[str, Any]) -> str:
    """A signal step's record in a step label: the signal and what it targets
    ("SIGTERM svcd", "SIGHUP pid 4242", "SIGTERM pid file /run/x.pid")."""
    sig = f"SIG{safe(st['signal'])} " if st.get("signal") else ""
    target = (safe(st["process"]) if st.get("process") else
              f"pid {safe(st['pid'])}" if st.get("pid") else
              f"pid file {safe(st['pid_file'])}" if st.get("pid_file") else "")
    return sig + target


def skipped_lines(st: dict[str, Any]) -> list[str]:
    """The processes a signal step found but left alone (a step record, or a dry run's
    step), one line each as graced bounds them, and how many more it counted."""
    raw = st.get("skipped")
    listed: list[Any] = raw if isinstance(raw, list) else []
    lines = []
    for s in listed:
        if not isinstance(s, dict):
            continue
        uid = "" if s.get("uid") is None else f", uid {safe(s['uid'])}"
        lines.append(f"       skipped pid {safe(s.get('pid'))} ({safe(s.get('name'))}{uid}): "
                     f"{safe(s.get('reason'))}")
    count = st.get("skipped_count")
    more = count - len(listed) if isinstance(count, int) else 0
    if more > 0:
        lines.append(f"       and {more} more skipped")
    return lines


def step_result(st: dict[str, Any]) -> str:
    """How a step that ran ended, in words: "ok, exit 0, 0.2 s" or "FAILED (why), 5 s";
    what the record does not hold (no exit code: it timed out or never started; no
    error or duration) left out, never printed as Python's None."""
    error = st.get("error")
    status = "ok" if st.get("ok") else f"FAILED ({safe(error)})" if error else "FAILED"
    code = st.get("exit_code")
    took = st.get("duration_s")
    return ", ".join([status, *([f"exit {safe(code)}"] if code is not None else []),
                      *([f"{safe(took)} s"] if took is not None else [])])


def no_value(v: Any) -> str:
    """A sample's value as human output shows it: as JSON writes it, "no value" for none."""
    return "no value" if v is None else value(v)
