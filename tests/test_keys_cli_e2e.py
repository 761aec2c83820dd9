"""What the README and gracectl.1 promise about keys, config units and completion, run
against the real graced and gracectl: ``keys show``, ``keys trust`` (a changed key refused
loudly, ``--replace``), ``keys generate`` (its line admits a TCP approval),
``graced config units`` and shell completion."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import pytest

from graced.protocol import ExitCode
from tests.conftest import Graced, bin_path
from tests.helpers.tcp import keyed_daemon
from tests.test_missions_e2e import MISSIONS, Watch
from tests.test_remediation_e2e import (
    kill_all,
    mission,
    process_detector,
    restart_playbook,
    start_sleeper,
)


@pytest.mark.slow
def test_keys_show_trust_and_a_changed_key_refused_loudly(graced: Graced) -> None:
    g = graced
    pub = (g.state / "key.pub").read_text().split()[1]
    shown = json.loads(g.ctl("keys", "show", "--json", check=True).stdout)
    assert shown["public_key"] == pub and shown["trust"] == "not pinned"
    endpoint = f"unix:{g.socket}"
    assert shown["endpoint"] == endpoint
    trusted = g.ctl("keys", "trust", check=True).stderr
    assert trusted.startswith(f"gracectl: trusted key {shown['kid']}"), trusted
    human = g.ctl("keys", "show", check=True).stdout.splitlines()
    assert human == [f"key id      {shown['kid']}", f"public key  ed25519 {pub}",
                     f"endpoint    {endpoint}", "trust       pinned"]

    # Another daemon (a fresh state dir, so a new key) answers on the same socket.
    assert g.stop() == 0
    g.state.rename(g.base / "state.old")
    g.start()
    new = json.loads(g.ctl("keys", "show", "--json", check=True).stdout)
    assert new["kid"] != shown["kid"] and new["trust"] == "MISMATCH"
    refused = g.ctl("keys", "trust")
    assert refused.returncode == ExitCode.BAD_SIGNATURE
    assert refused.stderr.count("\n") == 1 and "has CHANGED" in refused.stderr
    assert f"pinned {shown['kid']}, now offered {new['kid']}" in refused.stderr
    # Every command that verifies refuses the impostor's answers, not only `keys trust`.
    status = g.ctl("status")
    assert status.returncode == ExitCode.BAD_SIGNATURE and status.stdout == "", status
    tail = g.ctl("tail", "--verify", "--since", "1", "--no-follow")
    assert tail.returncode == ExitCode.BAD_SIGNATURE and tail.stdout == "", tail

    replaced = g.ctl("keys", "trust", "--replace", check=True)
    assert f"trusted key {new['kid']}" in replaced.stderr
    assert json.loads(g.ctl("keys", "show", "--json", check=True).stdout)["trust"] == "pinned"
    assert g.ctl("status").returncode == 0
    known = json.loads((g.home / ".config" / "grace" / "known_keys.json").read_text())
    assert known[endpoint]["kid"] == new["kid"]


@pytest.mark.slow
def test_keys_generate_makes_a_key_whose_line_admits_a_tcp_approval(make_graced) -> None:
    marker = f"grace-worker-{os.getpid()}-keys"
    g = make_graced(start=False, extra_config='listen = ["127.0.0.1:0"]\n',
                    detectors=process_detector(marker) + restart_playbook(marker, "high")
                    + MISSIONS.format(flap=0) + '\n[remediation]\nauthorized_keys = ["KEY"]\n')
    first = g.ctl("keys", "generate", check=True)
    line = first.stdout.strip()
    key = g.home / ".config" / "grace" / "client.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (key.parent / "client.key.pub").read_text().strip() == line
    again = g.ctl("keys", "generate")
    assert again.returncode == 1 and "exists; use --force" in again.stderr
    assert again.stdout == ""
    forced = g.ctl("keys", "generate", "--force", check=True).stdout.strip()
    assert forced != line and (key.parent / "client.key.pub").read_text().strip() == forced
    line = forced

    sleeper = start_sleeper(marker)
    try:
        g.config.write_text(g.config.read_text().replace('"KEY"', json.dumps(line)))
        g.start()
        w = Watch(g)
        port = json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["tcp_ports"][0]
        sleeper.kill()
        sleeper.wait()
        mid = w.wait("mission.awaiting_approval", "worker", 15)["payload"]["id"]
        env = {k: v for k, v in g.env.items() if k != "GRACE_SOCKET"}
        env["GRACE_KEY"] = str(g.state / "key.pub")  # over TCP a key must be pinned or given
        res = g.ctl("--url", f"ws://127.0.0.1:{port}", "missions", "approve", str(mid),
                    "--yes", env=env)
        assert res.returncode == 0, res.stderr
        w.wait("mission.resolved", "worker", 30)
        assert mission(g, mid)["approvals"][0]["auth"] == \
            f"signed request (ed25519 {line.split()[2]})"
        w.close()
    finally:
        sleeper.kill()
        kill_all(marker)


def test_config_units_lists_each_restarted_unit_once(shortdir) -> None:
    cfg = shortdir / "graced.toml"
    steps = "".join(f'[[playbook]]\nname = "p{i}"\ndetector = "d"\nrisk = "low"\n'
                    f'[[playbook.step]]\naction = "restart_unit"\nunit = "{unit}"\n'
                    f'[[playbook.step]]\naction = "run"\nargv = ["true"]\n'
                    for i, unit in enumerate(["web.service", "db.service", "web.service"]))
    steps += ('[[playbook]]\nname = "clean"\ndetector = "d"\nrisk = "low"\n'
              '[[playbook.step]]\naction = "start_action"\nunit = "clean-logs"\n')
    cfg.write_text('version = 1\n[[detector]]\nname = "d"\nkind = "load"\n' + steps)
    res = subprocess.run([bin_path("graced"), "config", "units", "--config", str(cfg)],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "db.service\nweb.service\ngrace-action@clean-logs.service\n"
    as_json = subprocess.run([bin_path("graced"), "config", "units", "--config", str(cfg),
                              "--json"], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL)
    assert (as_json.returncode, as_json.stderr) == (0, "")
    assert json.loads(as_json.stdout) == {"units": ["db.service", "web.service"],
                                          "actions": ["grace-action@clean-logs.service"]}
    empty = subprocess.run([bin_path("graced"), "config", "units", "--config",
                            str(shortdir / "missing.toml")], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
    assert empty.returncode == 3 and empty.stdout == "" and empty.stderr.count("\n") == 1


@pytest.mark.slow
def test_bash_completion_completes_commands_and_options(shortdir) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    env = dict(os.environ, _GRACECTL_COMPLETE="bash_source")
    script = subprocess.run([bin_path("gracectl")], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, check=True).stdout
    (shortdir / "complete.bash").write_text(script)

    def complete(line: str) -> list[str]:
        # As bash does on TAB: COMP_WORDS/COMP_CWORD set, the registered function called.
        words = line.split(" ")
        driver = (f'source {shortdir / "complete.bash"}\n'
                  f'COMP_WORDS=({" ".join(json.dumps(w) for w in words)})\n'
                  f"COMP_CWORD={len(words) - 1}\n"
                  f'fn=$(complete -p gracectl | sed -E "s/.*-F ([^ ]+) .*/\\1/")\n'
                  '$fn gracectl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
                  'printf "%s\\n" "${COMPREPLY[@]}"\n')
        res = subprocess.run([bash, "--norc", "--noprofile", "-c", driver],
                             env=dict(os.environ, PATH=f"{os.path.dirname(bin_path('gracectl'))}"
                                      f":{os.environ.get('PATH', '')}"),
                             capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.split()

    assert "missions" in complete("gracectl mi") and "status" not in complete("gracectl mi")
    assert {"approve", "reject", "show", "ls"} <= set(complete("gracectl missions "))
    assert "--verify" in complete("gracectl tail --ver")
    for shell in ("zsh", "fish"):
        # The script each shell sources asks gracectl itself for the candidates, with
        # COMP_WORDS and COMP_CWORD as the shell fills them: run that exchange.
        env = dict(os.environ, _GRACECTL_COMPLETE=f"{shell}_source")
        src = subprocess.run([bin_path("gracectl")], env=env, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, check=True).stdout
        assert f"_GRACECTL_COMPLETE={shell}_complete " in src, src
        assert shell_complete(shell, "gracectl mi") == ["missions"], shell
        assert {"approve", "reject", "show", "ls"} <= set(
            shell_complete(shell, "gracectl missions ")), shell
        assert shell_complete(shell, "gracectl tail --ver") == ["--verify"], shell


def shell_complete(shell: str, line: str) -> list[str]:
    """The plain candidates gracectl answers the zsh or fish completion script with for
    ``line`` (the cursor at its end): zsh sends the word index and reads (type, value,
    description) triples; fish sends the current word and reads "type,value\tdescription"."""
    words = line.split(" ")
    cword = str(len(words) - 1) if shell == "zsh" else words[-1]
    res = subprocess.run([bin_path("gracectl")], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=60,
                         env=dict(os.environ, _GRACECTL_COMPLETE=f"{shell}_complete",
                                  COMP_WORDS=line, COMP_CWORD=cword))
    assert res.returncode == 0 and res.stderr == "", res
    if shell == "zsh":
        out = res.stdout.splitlines()
        return [value for kind, value in zip(out[::3], out[1::3], strict=True)
                if kind == "plain"]
    return [entry.split("\t")[0].partition(",")[2] for entry in res.stdout.splitlines()
            if entry.startswith("plain,")]


@pytest.mark.slow
def test_a_private_key_others_may_read_and_a_pin_file_others_may_write_are_refused(
        make_graced) -> None:
    """As ssh: a client key readable by group or others is refused (it is no longer this
    user's alone), and so is a known keys file they may write (they would choose the key
    gracectl trusts); one line naming the file, nothing on stdout. chmod mends both."""
    g, port, env, _ = keyed_daemon(make_graced, "read_keys")
    url = f"ws://127.0.0.1:{port}"
    key = g.home / ".config" / "grace" / "client.key"
    assert g.ctl("--url", url, "status", env=env).returncode == 0
    key.chmod(0o644)
    res = g.ctl("--url", url, "status", env=env)
    assert res.returncode == ExitCode.ERROR and res.stdout == "", res
    assert res.stderr == (f"gracectl: {key}: private key has mode 0644: refusing it "
                          f"(chmod 600 {key})\n"), res.stderr
    key.chmod(0o600)
    assert g.ctl("--url", url, "status", env=env).returncode == 0

    known = g.home / ".config" / "grace" / "known_keys.json"
    assert g.ctl("status").returncode == 0  # pins the socket's key
    known.chmod(0o666)
    res = g.ctl("status")
    assert res.returncode != 0 and res.stdout == "", res
    assert res.stderr.count("\n") == 1 and f"{known}: the known keys file has mode 0666: " \
        f"refusing it (chmod go-w {known})" in res.stderr, res.stderr
    known.chmod(0o644)
    assert g.ctl("status").returncode == 0
