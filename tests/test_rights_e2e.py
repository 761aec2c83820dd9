"""Who may steer graced over its Unix socket (docs/security.md, graced.toml(5)), each as a
real second Unix user against the real graced (created when root; skipped otherwise):
a user who is no approver is refused ``missions reject``, ``pause``, ``resume``,
``knowledge import`` and ``knowledge reset --source`` (exit 4, nothing changed), a
member of an approver group may do each, and a user named in ``approvers`` (no group)
approves under that name."""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys

import pytest

from graced.protocol import ExitCode
from tests.conftest import Graced
from tests.helpers.users import ensure_user
from tests.test_documented_e2e import (  # noqa: F401
    APPROVER,
    GROUP,
    approver,
    awaiting_group_approval,
    marker,
)
from tests.test_learning_hostile_e2e import Exporter, record
from tests.test_remediation_e2e import mission
from tests.test_security_e2e import HANDOFF

OUTSIDER = "grace-outsider"


def as_user(g: Graced, user: str, *args: str, groups: bool) -> subprocess.CompletedProcess[str]:
    """The real gracectl run as ``user`` (with its supplementary groups, or none), with a
    home of its own on the daemon's socket, where the daemon's key is pinned first."""
    home = g.base / f"home-{user}"
    env = dict(g.env, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    env.pop("GRACE_KNOWN_KEYS", None)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", "--reuid", user, "--regid", "nogroup",
                               "--init-groups" if groups else "--clear-groups",
                               g.ctl_argv0(), *argv], env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=60)

    if not home.exists():
        home.mkdir()
        entry = pwd.getpwnam(user)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        pinned = run("keys", "trust", "--key", str(g.base / "key.pub"))
        assert pinned.returncode == 0, pinned.stderr
    return run(*args)


def raw_request(g: Graced, user: str, method: str, params: dict) -> dict:
    """One request on a connection of its own, as ``user`` with no groups; the reply."""
    request = json.dumps({"id": 1, "nonce": "n-1", "method": method, "params": params})
    proc = subprocess.Popen(["setpriv", "--reuid", user, "--regid", "nogroup",
                             "--clear-groups", sys.executable, str(HANDOFF), str(g.socket),
                             request], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=g.env)
    out, _ = proc.communicate("go\n", timeout=60)  # the pid it prints, then the reply
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def share_key(g: Graced) -> None:
    """The daemon's key.pub where the other users can read it (the state dir is 0700)."""
    (g.base / "key.pub").write_text((g.state / "key.pub").read_text())


def refused(res: subprocess.CompletedProcess[str]) -> bool:
    return (res.returncode == ExitCode.NOT_AUTHORISED and res.stdout == ""
            and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr)


def paused(g: Graced) -> bool:
    return bool(json.loads(g.ctl("playbooks", "ls", "--json", check=True).stdout)["paused"])


def knowledge(g: Graced) -> list[str]:
    return [p["pattern"] for p in json.loads(g.ctl("knowledge", "ls", "--json",
                                                   check=True).stdout)]


@pytest.mark.slow
def test_only_approvers_reject_pause_resume_and_import(make_graced, marker,  # noqa: F811
                                                       approver: str) -> None:  # noqa: F811
    outsider = ensure_user(OUTSIDER)
    g, w, waiting = awaiting_group_approval(make_graced, marker)
    share_key(g)
    mid = str(waiting["id"])
    exporter = Exporter(g.base)
    export = exporter.write(g.base / "export.json", [record()])
    imports = ("knowledge", "import", "--key", str(exporter.key), str(export))

    # Not an approver: each refused with one line, and nothing changed.
    res = as_user(g, outsider, "missions", "reject", mid, "--comment", "not mine", groups=True)
    assert refused(res) and "may not reject" in res.stderr, res
    m = mission(g, waiting["id"])
    assert m["state"] == "awaiting_approval" and m["approvals"] == [], m["approvals"]
    for command in ("pause", "resume"):
        res = as_user(g, outsider, command, groups=True)
        assert refused(res) and "pause/resume needs an approver" in res.stderr, res
        assert not paused(g)
    res = as_user(g, outsider, *imports, groups=True)
    assert refused(res) and "knowledge import needs an approver" in res.stderr, res
    # knowledge.import checks the caller itself, not only knowledge.upload before it.
    reply = raw_request(g, outsider, "knowledge.import", {
        "key": exporter.key.read_text().split()[1], "replace_key": False, "dry_run": False})
    assert (reply["ok"], reply["error"]["code"]) == (False, "not_authorised"), reply
    assert knowledge(g) == []
    # A dry run only reads: anyone who may read may see what an import would change
    # (the newcomer review's P12), and nothing changes.
    res = as_user(g, outsider, *imports[:-1], "--dry-run", str(export), groups=True)
    assert res.returncode == 0, res.stderr
    assert "dry run: 1 records from foreign-host" in res.stderr and "nothing changed" \
        in res.stderr, res.stderr
    assert knowledge(g) == []

    # A member of the approver group: each done.
    assert as_user(g, approver, "pause", groups=True).returncode == 0
    assert paused(g)
    assert as_user(g, approver, "resume", groups=True).returncode == 0
    assert not paused(g)
    res = as_user(g, approver, *imports, groups=True)
    assert res.returncode == 0, res.stderr
    assert knowledge(g) == ["star:queue"]
    # Forgetting the source's pinned key is an approver's too (#22, third review).
    forget = ("knowledge", "reset", "--source", "foreign-daemon")
    res = as_user(g, outsider, *forget, groups=True)
    assert refused(res) and "knowledge reset --source needs an approver" in res.stderr, res
    assert knowledge(g) == ["star:queue"]
    res = as_user(g, approver, *forget, groups=True)
    assert res.returncode == 0 and "forgot source foreign-daemon" in res.stderr, res.stderr
    assert knowledge(g) == []
    assert as_user(g, approver, *imports, groups=True).returncode == 0
    res = as_user(g, approver, "missions", "reject", mid, "--comment", "not now", groups=True)
    assert res.returncode == 0, res.stderr
    m = mission(g, waiting["id"])
    assert m["state"] == "rejected" and not m["steps"], m
    assert [(a["decision"], a["user"], a["comment"]) for a in m["approvals"]] == [
        ("rejected", approver, "not now")]
    w.close()


@pytest.mark.slow
def test_a_user_named_in_approvers_approves_without_any_group(make_graced,
                                                              marker: str) -> None:  # noqa: F811
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second Unix user and act as it")
    user = ensure_user(APPROVER)
    g, w, waiting = awaiting_group_approval(make_graced, marker,
                                            remediation=f'approvers = ["{user}"]\n')
    share_key(g)
    outsider = ensure_user(OUTSIDER)
    res = as_user(g, outsider, "missions", "approve", str(waiting["id"]), "--yes",
                  groups=False)
    assert refused(res) and "may not approve" in res.stderr, res
    # No supplementary groups at all: the name alone admits it.
    res = as_user(g, user, "missions", "approve", str(waiting["id"]), "--yes", "--comment",
                  "by name", groups=False)
    assert res.returncode == 0, res.stderr
    w.wait("mission.resolved", "worker", 30)
    m = mission(g, waiting["id"])
    assert m["state"] == "resolved" and m["steps"], m["timeline"]
    approval = m["approvals"][0]
    assert (approval["decision"], approval["user"], approval["uid"], approval["comment"]) == (
        "approved", user, pwd.getpwnam(user).pw_uid, "by name")
    w.close()


def as_user_popen(g: Graced, user: str, *args: str) -> subprocess.Popen[str]:
    """A long-running gracectl as ``user`` (with its groups), home made by as_user."""
    home = g.base / f"home-{user}"
    env = dict(g.env, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    return subprocess.Popen(["setpriv", "--reuid", user, "--regid", "nogroup",
                             "--init-groups", g.ctl_argv0(), *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def unix_clients(g: Graced) -> int:
    """Unix clients connected, besides the status request that asks."""
    status = json.loads(g.ctl("status", "--json", check=True).stdout)
    return int(status["wire"]["unix_clients"]) - 1


@pytest.mark.slow
def test_one_reader_cannot_lock_out_an_approver_and_every_refusal_says_why(
        make_graced, approver: str) -> None:  # noqa: F811
    """A reader holding connections meets its per-user cap, told why on the tail path
    too (exit 3, one line with the reason); an approver still gets in on the reserved
    slots once the shared ones are full; graced's log names each refusal."""
    from tests.helpers.procs import poll_until

    outsider = ensure_user(OUTSIDER)
    g = make_graced(extra_config="max_clients = 3\nreserved_clients = 2\n"
                    f'max_clients_per_user = 2\n[remediation]\napprover_groups = ["{GROUP}"]\n')
    os.chmod(g.socket, 0o666)
    os.chmod(g.base, 0o755)
    os.chmod(g.home, 0o777)
    share_key(g)
    held: list[subprocess.Popen[str]] = []
    try:
        assert as_user(g, outsider, "status", groups=True).returncode == 0
        for n in (1, 2):
            held.append(as_user_popen(g, outsider, "tail", "-n", "0", "nothing.*"))
            poll_until(lambda n=n: unix_clients(g) == n, 20, f"{n} reader(s) connected")
        # Its third: refused by the per-user cap, and tail says why.
        res = as_user(g, outsider, "tail", "--no-follow", "-n", "1", groups=True)
        assert res.returncode == ExitCode.UNREACHABLE and res.stdout == "", res
        assert res.stderr.count("\n") == 1 and (
            f"too many clients of user {outsider} (uid {pwd.getpwnam(outsider).pw_uid}) "
            "(limit 2 a user: [daemon] max_clients_per_user)") in res.stderr, res.stderr
        # The approver takes the last shared slot, then a reserved one.
        as_user(g, approver, "status", groups=True)  # its home and pinned key
        held.append(as_user_popen(g, approver, "tail", "-n", "0", "nothing.*"))
        poll_until(lambda: unix_clients(g) == 3, 20, "the approver's reader connected")
        res = as_user(g, approver, "status", groups=True)
        assert res.returncode == 0, res.stderr
        res = as_user(g, outsider, "status", groups=True)  # full for it, and told so
        assert res.returncode == ExitCode.UNREACHABLE and "too many clients (limit 3, 2 more " \
            "for root, graced's user and approvers)" in res.stderr, res.stderr
        assert "too many clients of user" in g.stderr()  # graced's log says it too
    finally:
        for proc in held:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_socket_group_gives_read_access_and_a_refused_user_gets_a_hint(make_graced) -> None:
    """Outside systemd, [daemon] socket_group gives the socket to a group: its members
    read, and anyone else meets Permission denied with what to do (exit 4)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second Unix user and act as it")
    from tests.helpers.users import ensure_group

    group = ensure_group("grace-readers")
    reader = ensure_user("grace-reader", (group,))
    outsider = ensure_user(OUTSIDER)
    g = make_graced(extra_config=f'socket_group = "{group}"\n')
    os.chmod(g.base, 0o755)
    os.chmod(g.home, 0o777)
    share_key(g)
    st = os.stat(g.socket)
    assert (st.st_gid, st.st_mode & 0o777) == (grp.getgrnam(group).gr_gid, 0o660)
    res = as_user(g, reader, "status", "--json", groups=True)
    assert res.returncode == 0, res.stderr
    res = subprocess.run(["setpriv", "--reuid", outsider, "--regid", "nogroup",
                          "--init-groups", g.ctl_argv0(), "--key", str(g.base / "key.pub"),
                          "status"], env=g.env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=60)
    assert refused(res), res
    assert f"Permission denied (the socket is mode 0660, group {group}: ask to be added " \
        f"to group {group}, see [daemon] socket_group in graced.toml(5))" in res.stderr
