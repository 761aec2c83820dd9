"""`graced config check` refuses configs that can never work, per kind, with one line each;
`graced config default` takes graced.toml(5)'s examples appended."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from graced.errors import DaemonExit
from tests.conftest import bin_path
from tests.test_config_keys import graced_cmd

ROOT = Path(__file__).resolve().parent.parent
MEMORY = '[[detector]]\nname = "m"\nkind = "memory"\n'
PLAYBOOK = ('[[playbook]]\nname = "p"\ndetector = "{det}"\nrisk = "low"\n'
            '[[playbook.step]]\naction = "run"\nargv = ["true"]\n')


@pytest.mark.parametrize("text, needle", [
    # The configs that `config check` used to call ok.
    (MEMORY + PLAYBOOK.format(det="nosuch"),
     ":6: [[playbook]] #1 (p) detector: no detector named 'nosuch' (detectors: m)"),
    ('[[notifier]]\nname = "n"\nkind = "command"\nargv = ["true"]\non = ["exploded"]\n',
     ":5: [[notifier]] #1 (n) on: 'exploded': must be one of \"detected\""),
    (MEMORY + 'url = "http://x/"\n',
     ':4: [[detector]] #1 (m) url: not a key of kind "memory" (known keys: baseline, below,'),
    (MEMORY + 'file = "/var/log/x"\n', ':4: [[detector]] #1 (m) file: not a key of kind '
                                       '"memory"'),
    (MEMORY + "max_ratio = 0.5\n", ':4: [[detector]] #1 (m) max_ratio: not a key of kind '
                                   '"memory"'),
    (MEMORY + "threshold = -5\n", ":4: [[detector]] #1 (m) threshold: must be between 0 and "
                                  "100"),
    (MEMORY + "interval = 0.0001\n", ":4: [[detector]] #1 (m) interval: must be at least "
                                     "0.01 s"),
    # More of the same family.
    (MEMORY + "bogus = 1\n", ':4: [[detector]] #1 (m) bogus: not a key of kind "memory"'),
    ('[[detector]]\nname = "t"\nkind = "tcp"\nhost = "h"\nport = 70000\n',
     ":5: [[detector]] #1 (t) port: must be between 1 and 65535"),
    ('[[detector]]\nname = "x"\nkind = "nosuch"\n',
     ':3: [[detector]] #1 (x) kind: must be one of "memory", "swap"'),
    ('[[detector]]\nname = "x"\n', ":1: [[detector]] #1 (x) kind: missing"),
    ('[[detector]]\nname = "h"\nkind = "http"\nurl = "ftp://x"\n',
     ":4: [[detector]] #1 (h) url: must be an http(s) URL"),
    ('[[detector]]\nname = "l"\nkind = "log"\nfile = "/x"\npattern = "(("\nmax_rate = 1\n',
     ":5: [[detector]] #1 (l) pattern: not a valid regular expression"),
    ('[[playbook]]\nname = "p"\nrisk = "low"\n[[playbook.step]]\naction = "restart_unit"\n'
     'unit = "a.service"\nargv = ["x"]\n',
     ':7: [[playbook]] #1 (p) step 1 argv: not a key of action "restart_unit"'),
    ('[[playbook]]\nname = "p"\nkind = "memroy"\nrisk = "low"\n[[playbook.step]]\n'
     'action = "run"\nargv = ["true"]\n',
     ":3: [[playbook]] #1 (p) kind: no detector kind 'memroy'"),
    ('[[notifier]]\nname = "n"\nkind = "webhook"\nurl = "https://x/"\nargv = ["a"]\n',
     ':5: [[notifier]] #1 (n) argv: not a key of kind "webhook"'),
    # A unit name that would inject JavaScript into the polkit rule install.sh writes.
    ('[[playbook]]\nname = "p"\nrisk = "low"\n[[playbook.step]]\naction = "restart_unit"\n'
     "unit = 'app.service\"]; polkit.addRule(function(a, s) { return 1; }); var X = [\"'\n",
     ":6: [[playbook]] #1 (p) step 1 unit: not a systemd unit name"),
    # A NUL passed check and took graced down when the step ran (exec refuses it).
    (PLAYBOOK.format(det="m").replace('["true"]', '["/bin/echo", "a\\u0000b"]'),
     ":7: [[playbook]] #1 (p) step 1 argv: must not contain a NUL character"),
    (PLAYBOOK.format(det="m") + 'env = ["A=\\u0000"]\n',
     ":8: [[playbook]] #1 (p) step 1 env: must not contain a NUL character"),
    (PLAYBOOK.format(det="m") + 'cwd = "/tmp\\u0000x"\n',
     ":8: [[playbook]] #1 (p) step 1 cwd: must not contain a NUL character"),
    # What the newcomer review found "ok" that broke at run time.
    ('[remediation]\ncontrol_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoq'
     'KLsabgH5C9okWi0dh2l9GKJl ops@host"]\n',
     ":2: [remediation] control_keys: entry 1 is not an Ed25519 public key (an ssh key: use "
     "'gracectl keys generate')"),
    ('[remediation]\nread_keys = ["ed25519 Ty8QpMHM9Kh3MvgHJGK4x4fV3KbskgWpG2oIG1EBqOA= '
     'b24d53773b3a6750"]\n',
     ":2: [remediation] read_keys: entry 1 names key id b24d53773b3a6750, but its key's id "
     "is b24d53773b3a6759"),
    ('[daemon]\nlisten = ["0.0.0.0:8552"]\n',
     ":2: [daemon] listen '0.0.0.0:8552': plain ws:// is served only on loopback; set "
     "[daemon] tls_cert and tls_key"),
    ('[daemon]\ntls_cert = "/etc/graced/cert.pem"\n',
     ":2: [daemon] tls_cert without tls_key: the two go together"),
    ('[[detector]]\nname = "h"\nkind = "http"\nurl = "http://a:b@h:99999/x?t=1"\n',
     ":4: [[detector]] #1 (h) url: is not a usable URL (Port out of range 0-65535)"),
    ('[[detector]]\nname = "h"\nkind = "http"\nurl = "http://[::1/"\n',
     ":4: [[detector]] #1 (h) url: is not a usable URL (Invalid IPv6 URL)"),
    ('[[notifier]]\nname = "n"\nkind = "webhook"\nurl = "http://h/a\\r\\nX-Evil: 1"\n',
     ":4: [[notifier]] #1 (n) url: holds white space or a control character"),
])
def test_config_that_cannot_work_is_refused_in_one_line(tmp_path: Path, text: str,
                                                        needle: str) -> None:
    path = tmp_path / "graced.toml"
    path.write_text(text)
    res = graced_cmd("config", "check", str(path))
    assert res.returncode == DaemonExit.CONFIG, res.stdout
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"graced: config error: {path}"), res.stderr
    assert needle in res.stderr, res.stderr
    assert res.stdout == ""
    assert "a:b@" not in res.stderr  # no URL credentials echoed


@pytest.mark.parametrize("extra, why", [
    ("enabled = false\n", "detector 'm' is disabled"),
    ('severity = "low"\n', "its severities critical are never those of its detectors' "
                           "missions (low, medium)"),
])
def test_a_playbook_that_can_never_match_is_a_warning(tmp_path: Path, extra: str,
                                                      why: str) -> None:
    path = tmp_path / "graced.toml"
    path.write_text(MEMORY + extra + PLAYBOOK.format(det="m").replace(
        'risk = "low"', 'risk = "low"\nseverities = ["critical"]'))
    res = graced_cmd("config", "check", str(path))
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{path}: ok\n"
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"graced: warning: {path}:5: "), lines
    assert "[[playbook]] #1 (p) never matches: " + why in lines[0]


def _examples() -> list[str]:
    text = (ROOT / "man" / "graced.toml.5").read_text()
    section = text.split(".SH EXAMPLES", 1)[1].split(".SH ", 1)[0]
    blocks = re.findall(r"^\.nf\n(.*?)^\.fi$", section, re.S | re.M)
    # roff escapes back to the characters the reader types
    return [b.replace("\\-", "-").replace("\\(rs", "\\").replace("\\e", "\\")
            for b in blocks]


@pytest.mark.slow
def test_every_example_appended_to_the_default_checks_ok(tmp_path: Path) -> None:
    default = graced_cmd("config", "default")
    assert default.returncode == 0 and "playbook = []" not in default.stdout
    examples = _examples()
    assert len(examples) >= 5
    for n, example in enumerate([*examples, "\n".join(examples)]):
        path = tmp_path / f"graced-{n}.toml"
        path.write_text(default.stdout + "\n" + example)
        res = graced_cmd("config", "check", str(path))
        assert (res.returncode, res.stdout) == (0, f"{path}: ok\n"), example
        # The only warnings: a file an example watches that this host does not have.
        for line in res.stderr.splitlines():
            missing = re.search(r" (file|path): (/\S+) does not exist \(yet\)", line)
            assert missing and not os.path.exists(missing[2]), (line, example)


def test_check_without_a_file_checks_what_graced_would_load(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("INVOCATION_ID", "GRACED_CONFIG", "CONFIGURATION_DIRECTORY")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    res = graced_cmd("config", "check", env=env)
    assert (res.returncode, res.stdout) == (0, "<embedded default>: ok\n"), res.stderr
    user = tmp_path / "cfg" / "graced" / "graced.toml"
    user.parent.mkdir(parents=True)
    user.write_text("[daemon]\nheartbeat_interval = 0\n")
    res = graced_cmd("config", "check", env=env)
    assert res.returncode == DaemonExit.CONFIG
    assert res.stderr == (f"graced: config error: {user}:2: [daemon] heartbeat_interval: "
                          "must be greater than 0\n")
    other = tmp_path / "other.toml"
    other.write_text("version = 1\n")
    res = graced_cmd("config", "check", env={**env, "GRACED_CONFIG": str(other)})
    assert (res.returncode, res.stdout) == (0, f"{other}: ok\n"), res.stderr


def test_a_config_the_user_cannot_read_is_one_line_exit_3(tmp_path: Path) -> None:
    """The service user and a root-only /etc/graced: a config error, not a traceback."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    secret = tmp_path / "etc"
    (secret / "graced").mkdir(parents=True)
    (secret / "graced" / "graced.toml").write_text("version = 1\n")
    secret.chmod(0o700)
    tmp_path.chmod(0o755)
    path = secret / "graced" / "graced.toml"
    env = {k: v for k, v in os.environ.items()
           if k not in ("INVOCATION_ID", "GRACED_CONFIG", "CONFIGURATION_DIRECTORY")}
    env.update(XDG_CONFIG_HOME=str(secret), HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path))
    as_nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                 bin_path("graced")]
    for args in (["config", "check", str(path)], ["config", "check"], ["run"]):
        res = subprocess.run([*as_nobody, *args], capture_output=True, text=True, env=env,
                             stdin=subprocess.DEVNULL, timeout=30)
        assert res.returncode == DaemonExit.CONFIG, (args, res.stderr)
        assert res.stderr == (f"graced: config error: {path}: cannot read: "
                              "Permission denied\n"), (args, res.stderr)


def test_config_units_expands_subject_from_the_detectors_units(tmp_path: Path) -> None:
    """graced.toml(5)'s restart-failed-unit example restarts "{subject}": the polkit rule
    gets the unit names the systemd detector lists; its glob cannot be listed, and a
    warning on stderr says so (stdout stays a clean list of units)."""
    example = next(e for e in _examples() if 'name = "restart-failed-unit"' in e)
    assert 'unit = "{subject}"' in example and '"app-*.service"' in example
    path = tmp_path / "graced.toml"
    path.write_text("version = 1\n" + example)
    res = graced_cmd("config", "units", "--config", str(path))
    assert res.returncode == 0 and res.stdout == "nginx.service\n", res
    assert res.stderr == (
        'graced: warning: playbook restart-failed-unit step 1 restarts "{subject}": detector '
        'failed-units watches units by the glob "app-*.service"; list the units it may '
        "restart in the polkit rule by hand (graced(8), PRIVILEGED ACTIONS)\n")
    rule = graced_cmd("config", "polkit-rule", str(ROOT / "systemd" / "graced.polkit.rules"),
                      "--config", str(path))
    assert 'var GRACED_UNITS = ["nginx.service"];' in rule.stdout and "{" not in "".join(
        line for line in rule.stdout.splitlines() if line.startswith("var GRACED_UNITS"))

    # Literal names only: all listed, no warning; a subject glob on the playbook narrows.
    path.write_text(path.read_text().replace('"app-*.service", ', '"app-1.service", ')
                    .replace('budget = 3', 'budget = 3\nsubject = "app-*"'))
    res = graced_cmd("config", "units", "--config", str(path))
    assert (res.returncode, res.stdout, res.stderr) == (0, "app-1.service\n", "")


@pytest.mark.slow
def test_a_deep_oversized_or_special_file_is_one_line_exit_3(tmp_path: Path) -> None:
    """A TOML nested 3000 deep (tomllib recurses), a file past the size limit and a FIFO
    (which would block the open for ever): a config error each, never a traceback or hang."""
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 3000 + "]" * 3000 + "\n")
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * (5 * 1024 * 1024 // 10))
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo, 0o644)
    cases = {deep: "arrays or tables nested too deeply",
             big: "more than a config may hold (4194304)", fifo: "not a regular file"}
    for path, reason in cases.items():
        for args in (["config", "check", str(path)], ["run", "--config", str(path)]):
            res = graced_cmd(*args)
            assert res.returncode == DaemonExit.CONFIG, (args, res.stderr)
            assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
            assert res.stderr.startswith(f"graced: config error: {path}: "), res.stderr
            assert reason in res.stderr, res.stderr


def test_check_warns_about_a_missing_path_and_a_missing_optional_module(tmp_path: Path
                                                                        ) -> None:
    """Valid configs that would fail once they run: config check says ok, and warns (one
    line each, naming file, line and key) — a watched path that does not exist, and the
    postgres example on a Python without psycopg."""
    gone = tmp_path / "gone"
    path = tmp_path / "graced.toml"
    path.write_text(f'version = 1\n[[detector]]\nname = "d"\nkind = "disk"\npath = "{gone}"\n'
                    f'[[detector]]\nname = "l"\nkind = "log"\nfile = "{gone}.log"\n'
                    'pattern = "ERROR"\nmax_rate = 1\n')
    res = graced_cmd("config", "check", str(path))
    assert (res.returncode, res.stdout) == (0, f"{path}: ok\n"), res.stderr
    assert res.stderr.splitlines() == [
        f"graced: warning: {path}:5: [[detector]] #1 (d) path: {gone} does not exist (yet): "
        "the detector fails until it does",
        f"graced: warning: {path}:9: [[detector]] #2 (l) file: {gone}.log does not exist "
        "(yet): the detector fails until it does"]

    example = next(e for e in _examples() if 'kind = "postgres"' in e)
    path.write_text("version = 1\n" + example)
    # A Python where psycopg cannot be imported, as on a host without the postgres extra.
    shadow = tmp_path / "site" / "psycopg"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("No module named \'psycopg\'")\n')
    env = dict(os.environ, PYTHONPATH=str(shadow.parent))
    res = graced_cmd("config", "check", str(path), env=env)
    assert (res.returncode, res.stdout) == (0, f"{path}: ok\n"), res.stderr
    [line] = res.stderr.splitlines()
    assert line.startswith(f"graced: warning: {path}:")
    assert line.endswith("kind: postgres needs the Python module psycopg (No module named "
                         "'psycopg'): install it (pip install '.[postgres]' in the grace "
                         "checkout, with the pip of the venv graced runs from) or the "
                         "detector fails")
    assert graced_cmd("config", "check", str(path)).stderr == ""  # here it is installed


def test_check_refuses_tls_files_graced_cannot_load_and_warns_of_unknown_approvers(
        tmp_path: Path) -> None:
    """nginx -t's way: a certificate graced could not load at start is an error (exit 3,
    one line); approvers and groups this host does not know, and a state dir graced run
    would refuse, are warnings naming them."""
    path = tmp_path / "graced.toml"
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o775)
    head = f'version = 1\n[daemon]\nstate_dir = "{state}"\n'
    path.write_text(head + f'tls_cert = "{tmp_path}/none.pem"\ntls_key = "{tmp_path}/k.pem"\n')
    res = graced_cmd("config", "check", str(path))
    assert (res.returncode, res.stdout) == (DaemonExit.CONFIG, ""), res
    assert res.stderr.count("\n") == 1 and f"cannot load [daemon] tls_cert {tmp_path}/none.pem" \
        in res.stderr, res.stderr
    path.write_text(head + '[remediation]\napprovers = ["nosuchuser-g14"]\n'
                    'approver_groups = ["nosuchgroup-g14"]\n')
    res = graced_cmd("config", "check", str(path))
    assert (res.returncode, res.stdout) == (0, f"{path}: ok\n"), res.stderr
    assert res.stderr.splitlines() == [
        f"graced: warning: {path}:5: [remediation] approvers: no user 'nosuchuser-g14' on this "
        "host: nobody approves through it",
        f"graced: warning: {path}:6: [remediation] approver_groups: no group 'nosuchgroup-g14' "
        "on this host: nobody approves through it",
        f"graced: warning: state dir {state} is writable by group or others (mode 0775): "
        "graced run refuses it (it must belong to graced's user, writable by no one else)"]


def test_a_config_in_a_directory_others_may_write_is_a_warning(tmp_path: Path) -> None:
    """The file's own mode protects nothing when others may replace it: its directory
    writable by group or others (and not sticky) is a warning naming it."""
    where = tmp_path / "etc"
    where.mkdir()
    path = where / "graced.toml"
    path.write_text("version = 1\n")
    path.chmod(0o600)
    where.chmod(0o777)
    res = graced_cmd("config", "check", str(path))
    assert (res.returncode, res.stdout) == (0, f"{path}: ok\n"), res.stderr
    assert res.stderr == (f"graced: warning: {path}: its directory {where} is writable by "
                          f"group or others (mode 0777): they could replace the file: chmod "
                          f"go-w {where}\n"), res.stderr
    where.chmod(0o1777)  # sticky, as /tmp: only the owner may replace it
    assert graced_cmd("config", "check", str(path)).stderr == ""
