"""README, man pages and --help describe the same commands, options and config keys."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from gracectl.cli import cli as _ctl_cli
from graced.cli import cli as daemon_cli
from graced.config import (
    Config,
    DetectorConfig,
    NotifierConfig,
    PlaybookConfig,
    StepConfig,
)

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"

ctl_cli = _ctl_cli.load_all()  # fleet and web are loaded when asked for


def _walk(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, path)


def _options(cmd: click.Command) -> list[str]:
    out = []
    for p in cmd.params:
        if isinstance(p, click.Option):
            out.extend(o for o in p.opts if o.startswith("--") and o != "--help")
    return out


def _roff_text(path: Path) -> str:
    # Undo roff escapes so "\-\-json" reads "--json".
    return path.read_text().replace("\\-", "-").replace("\\(en", "-")


@pytest.mark.parametrize("group, man, prog", [
    (ctl_cli, "gracectl.1", "gracectl"), (daemon_cli, "graced.8", "graced"),
])
def test_every_command_and_option_is_in_the_man_page_and_readme(group: click.Group, man: str,
                                                                 prog: str) -> None:
    text = _roff_text(MAN / man)
    readme = (ROOT / "README.md").read_text()
    for opt in _options(group):
        assert opt in text, f"{prog} {opt} missing from man/{man}"
    for path, cmd in _walk(group):
        words = " ".join(path)
        assert re.search(rf"\b{re.escape(words)}\b", text), f"'{prog} {words}' not in man/{man}"
        assert f"{prog} {words}" in readme, f"'{prog} {words}' not in README.md"
        for opt in _options(cmd):
            assert opt in text, f"{prog} {words} {opt} missing from man/{man}"
            if not isinstance(cmd, click.Group):
                assert opt in readme, f"{prog} {words} {opt} missing from README.md"


@pytest.mark.parametrize("group", [ctl_cli, daemon_cli])
def test_every_environment_variable_an_option_reads_is_in_its_help(group: click.Group) -> None:
    """--help says which environment variable sets an option (GRACE_STREAM was read but
    not named)."""
    commands = [((), group), *_walk(group)]
    for path, cmd in commands:
        for p in cmd.params:
            if isinstance(p, click.Option) and isinstance(p.envvar, str):
                assert p.envvar in (p.help or ""), f"{' '.join(path)} {p.opts[0]}: {p.envvar}"


def test_every_config_key_is_in_graced_toml_5() -> None:
    text = _roff_text(MAN / "graced.toml.5")
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal"):
            continue
        if section.name == "version":
            assert ".B version" in text
            continue
        arrays = {"detector": DetectorConfig, "playbook": PlaybookConfig,
                  "notifier": NotifierConfig}
        if section.name in arrays:
            assert f"[[{section.name}]]" in text
            fields = dataclasses.fields(arrays[section.name])
            if section.name == "playbook":
                assert "[[playbook.step]]" in text
                fields = tuple(f for f in fields if f.name != "step") + dataclasses.fields(
                    StepConfig)
        else:
            assert f"[{section.name}]" in text, section.name
            fields = dataclasses.fields(section.default_factory())  # type: ignore[misc,arg-type]
        for f in fields:
            assert re.search(rf"^\.BR? .*\b{f.name}\b", text, re.M), (
                f"[{section.name}] {f.name} missing from graced.toml.5")


def test_exit_codes_are_documented() -> None:
    from graced.errors import DaemonExit
    from graced.protocol import ExitCode

    ctl = _roff_text(MAN / "gracectl.1")
    daemon = _roff_text(MAN / "graced.8")
    for code in ExitCode:
        assert re.search(rf"^{int(code)}\t", ctl, re.M), f"gracectl exit {int(code)} undocumented"
    for code in DaemonExit:
        assert re.search(rf"^{int(code)}\t", daemon, re.M), f"graced exit {int(code)}"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
@pytest.mark.parametrize("page", sorted(p.name for p in MAN.iterdir()))
def test_man_pages_render_without_warnings(page: str) -> None:
    res = subprocess.run(["groff", "-man", "-t", "-ww", "-z", str(MAN / page)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    assert len(blocks) >= 2
    install_run, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert install_run.endswith("graced") and "pip install" in install_run
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_each_detector_kinds_keys_are_listed_in_graced_toml_5() -> None:
    from graced.config import KINDS
    from graced.config.detectors import COMMON

    text = _roff_text(MAN / "graced.toml.5")
    listing = text.split(".SH [[detector]]", 1)[1].split(".RS\n", 1)[1].split(".RE\n", 1)[0]
    documented: dict[str, set[str]] = {}
    for entry in listing.split(".TP\n")[1:]:
        head, body = entry.split("\n", 1)
        body = " ".join(body.split())
        own = body.rsplit(":", 1)[1] if "no keys of their own" not in body else ""
        keys = {k.strip(" .") for k in own.split(",") if k.strip(" .")}
        for name in re.findall(r"[a-z_]+", head.removeprefix(".BR").removeprefix(".B")):
            documented[name] = keys
    assert set(documented) == set(KINDS)
    for kind, schema in KINDS.items():
        assert documented[kind] == set(schema.keys) - set(COMMON), kind


def test_the_keys_only_a_restart_applies_are_documented() -> None:
    from graced.reload import RESTART_ONLY

    for page in ("graced.8", "graced.toml.5"):
        text = " ".join(_roff_text(MAN / page).split())
        para = text[text.index("except [daemon]" if page.endswith("5") else "applies ([daemon]"):]
        para = para[:para.index("refused")]
        for section, keys in RESTART_ONLY.items():
            assert f"[{section}]" in para, (page, section)
            if section == "daemon":
                for key in keys:
                    assert re.search(rf"\b{key}\b", para), (page, key)


def test_each_step_action_and_notifier_kinds_keys_are_listed_in_graced_toml_5() -> None:
    from graced.config import ACTIONS, NOTIFIER_KINDS

    text = " ".join(_roff_text(MAN / "graced.toml.5").split())
    listed = dict(re.findall(r"\b([a-z_]+) \(keys: ([a-z_, ]+)\)", text))
    for name, action in ACTIONS.items():
        assert set(listed[name].split(", ")) == set(action.keys), name
    for kind, (keys, _) in NOTIFIER_KINDS.items():
        assert set(listed[kind].split(", ")) == set(keys), kind


def test_the_offline_verify_example_gives_the_key_in_readme_man_and_help() -> None:
    """Offline, on another machine, no key is pinned: README, gracectl(1) and
    'gracectl verify --help' each show the same example with --key and the daemon's
    key.pub, and the option they use is the command's own."""
    from click.testing import CliRunner

    example = "gracectl verify --key key.pub stream.jsonl"
    readme = (ROOT / "README.md").read_text()
    man = _roff_text(MAN / "gracectl.1")
    examples = man[man.index(".SH EXAMPLES"):]
    help_text = CliRunner().invoke(ctl_cli, ["verify", "--help"], terminal_width=200).output
    for where, text in (("README.md", readme), ("gracectl.1 EXAMPLES", examples),
                        ("verify --help", " ".join(help_text.split()))):
        assert example in text, f"{where} has no offline verify example with --key"
    assert "--key" in _options(ctl_cli.commands["verify"])


def test_no_doc_or_message_installs_an_extra_by_the_pypi_name_grace() -> None:
    """PyPI's "grace" is an unrelated project (CoffeeScript, slimit): `pip install` of
    the name with an extra on a fresh venv installs it. Every doc, message and comment
    says how to install an extra from this checkout ('.[fleet]'), never by that name."""
    by_name = re.compile("grace" + r"\[|pip install\s+(?:-\S+\s+)*['\"]?grace(?![\w./-])")
    found = []
    for top in ("README.md", "docs", "man", "graced", "gracectl", "tests", "bench", "systemd",
                ".ci", "pyproject.toml"):
        base = ROOT / top
        for path in [base] if base.is_file() else sorted(base.rglob("*")):
            if not path.is_file() or path.suffix in (".pyc", ".png"):
                continue
            text = path.read_text(errors="replace")
            found += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: "
                      f"{m.group()}" for m in by_name.finditer(text)]
    assert found == []
