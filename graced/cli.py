"""The ``graced`` command: run the daemon, check or print its config."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
import trio

from . import __version__, logs
from .config import ConfigError, default_config, load_config, locate, to_toml
from .errors import DaemonExit, StartupError
from .sd_notify import stderr_is_journal

CONTEXT = {"help_option_names": ["-h", "--help"]}


# syslog priorities (sd-daemon(3) "<N>" prefixes) of logging's levels.
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}


class _Format(logging.Formatter):
    """``<N>where: message`` for the journal; ``TIME LEVEL where: message`` otherwise.

    ``where`` is the logger below ``graced`` (``detectors``, ``reload``); none for
    graced's own logger (the journal and a terminal already say it is graced).
    """

    def __init__(self, journal: bool) -> None:
        super().__init__("%(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        where = record.name.removeprefix("graced").lstrip(".")
        text = (f"{where}: " if where else "") + super().format(record)
        if self.journal:
            level = PRIORITY.get(record.levelno, 6)
            return "\n".join(f"<{level}>{line}" for line in text.splitlines())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{stamp} {record.levelname.lower()} {text}"


def setup_logging(level: str) -> None:
    """graced's log lines on stderr, at ``level`` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format(stderr_is_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logs.set_level(level)


def _fail(message: str, code: int) -> None:
    # The journal names graced already; elsewhere the line says who speaks.
    click.echo(f"<3>{message}" if stderr_is_journal() else f"graced: {message}", err=True)
    sys.exit(code)


def _load(path: str | None, *, located: Path | None = None) -> object:
    try:
        return load_config(located or locate(path))
    except ConfigError as exc:
        _fail(f"config error: {exc}", DaemonExit.CONFIG)
        raise AssertionError from None


config_option = click.option(
    "--config", "-c", "config_path", metavar="FILE", type=click.Path(dir_okay=False),
    help="Config file (default: $GRACED_CONFIG, /etc/graced/graced.toml under systemd, "
    "~/.config/graced/graced.toml, else the embedded default).",
)


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@click.version_option(__version__, "--version", "-V", prog_name="graced")
@config_option
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """graced: keeps this host healthy by itself. With no command, runs the daemon."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run, config_path=config_path)


@cli.command()
@config_option
@click.option("--new-key", is_flag=True,
              help="If the signing key is missing but the journal holds events, make a new "
                   "key anyway (journaled in crypto.key_created as replacing the old one); "
                   "without it graced refuses to start (exit 4).")
def run(config_path: str | None, new_key: bool = False) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT; SIGHUP reloads the config."""
    from .app import Daemon, limit_malloc_arenas
    from .config import Config

    limit_malloc_arenas()

    # Found once: a reload reads this same file again (or the embedded default again).
    path = locate(config_path)
    cfg = _load(config_path, located=path) if path else default_config()
    assert isinstance(cfg, Config)
    setup_logging(cfg.daemon.log_level)
    for warning in cfg.warnings:
        logging.getLogger("graced.config").warning("%s", warning)
    try:
        try:
            trio.run(Daemon(cfg, path, new_key=new_key).run)
        except BaseExceptionGroup as group:
            leaf: BaseException = group
            while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
                leaf = leaf.exceptions[0]
            raise leaf from None
    except StartupError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(DaemonExit.OK)


@cli.group()
def config() -> None:
    """Check or print configuration."""


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
def config_check(file: str | None) -> None:
    """Check FILE (default: the config graced would load); exit 3 if it is invalid.

    An invalid file gets one line on stderr naming the file, line, key and reason; so does
    what graced would refuse at start (a TLS certificate or key it cannot load).
    Warnings (a playbook that can never match, a watched path that does not exist, a
    missing optional module such as psycopg, an approver this host does not know, a
    state dir graced would refuse) go to stderr; the file is still ok.
    """
    try:
        cfg = load_config(locate(file))
    except ConfigError as exc:
        _fail(f"config error: {exc}", DaemonExit.CONFIG)
        raise AssertionError from None
    from .safefiles import check_private_dir
    from .wire import tls_context

    try:
        tls_context(cfg.daemon.tls_cert, cfg.daemon.tls_key)
    except StartupError as exc:
        _fail(f"config error: {cfg.source}: {exc}", DaemonExit.CONFIG)
    problem = check_private_dir(cfg.state_dir) if cfg.state_dir.exists() else None
    if problem and problem.startswith("is owned by"):
        problem = None  # the check may run as another user than graced (root, for one)
    warnings = [*cfg.warnings, *([f"state dir {cfg.state_dir} {problem}: graced run refuses "
                                  "it (it must belong to graced's user, writable by no one "
                                  "else)"] if problem else [])]
    for warning in warnings:
        click.echo(f"graced: warning: {warning}", err=True)
    click.echo(f"{cfg.source}: ok")


def _units(config_path: str | None) -> tuple[list[str], list[str]]:
    """The units the playbooks restart, and the actions (grace-action@NAME.service) they start."""
    from .config import Config
    from .plan import action_unit, restart_units

    cfg = _load(config_path)
    assert isinstance(cfg, Config)
    steps = [st for pb in cfg.playbook for st in pb.step]
    units, warnings = restart_units(cfg)
    for warning in warnings:  # stdout stays a clean list
        click.echo(f"graced: warning: {warning}", err=True)
    actions = sorted({action_unit(st.unit) for st in steps if st.action == "start_action"})
    return units, actions


@config.command("units")
@config_option
@click.option("--json", "as_json", is_flag=True,
              help='Print {"units": [...], "actions": [...]} instead.')
def config_units(config_path: str | None, as_json: bool) -> None:
    """Print the units the playbooks restart, then the actions they start (for the polkit
    rule's GRACED_UNITS and GRACED_ACTIONS), one per line.

    "{subject}" is expanded from a systemd detector's units; what cannot be listed (a
    glob, {value}) is a warning on stderr: write those units into the rule by hand.
    """
    units, actions = _units(config_path)
    if as_json:
        click.echo(json.dumps({"units": units, "actions": actions}))
        return
    for unit in [*units, *actions]:
        click.echo(unit)


@config.command("polkit-rule")
@click.argument("template", type=click.Path(dir_okay=False))
@config_option
def config_polkit_rule(template: str, config_path: str | None) -> None:
    """Print the polkit rule TEMPLATE (systemd/graced.polkit.rules) with its GRACED_UNITS
    and GRACED_ACTIONS lines set to the config's units and actions (JSON arrays, which
    are JavaScript literals: no name can break out of its string). install.sh uses it."""
    units, actions = _units(config_path)
    try:
        with open(template, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"polkit rule template {template}: {exc}", DaemonExit.CONFIG)
        raise AssertionError from None
    values = {"GRACED_UNITS": units, "GRACED_ACTIONS": actions}
    done = set()
    for i, line in enumerate(lines):
        for name, value in values.items():
            if line.startswith(f"var {name} = "):
                # ensure_ascii: U+2028/2029, the two JSON characters JavaScript chokes on,
                # come out escaped.
                lines[i] = f"var {name} = {json.dumps(value, ensure_ascii=True)};\n"
                done.add(name)
    missing = sorted(set(values) - done)
    if missing:
        _fail(f"polkit rule template {template}: no line 'var {missing[0]} = ...'",
              DaemonExit.CONFIG)
    click.echo("".join(lines), nl=False)


@config.command("default")
def config_default() -> None:
    """Print the embedded default config as TOML."""
    click.echo(to_toml(default_config()), nl=False)


@cli.command()
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--kind", metavar="KIND",
              help="Score as this detector kind with its default settings "
                   "(memory, cpu, ..., or 'baseline' for the baseline alone).")
@click.option("--detector", "detector_name", metavar="NAME",
              help="Score as the detector NAME of the config.")
@config_option
@click.option("-o", "--output", type=click.File("w", encoding="utf-8", lazy=True), default="-",
              help="Write the scored CSV here (default: stdout).")
@click.option("--threshold", type=float, default=None, metavar="VALUE",
              help="Anomalous above VALUE (or below it, with --below).")
@click.option("--below", is_flag=True, help="Anomalous below the threshold instead of above.")
@click.option("--time-unit", "unit", type=click.Choice(["s", "ms", "us", "ns"]), default="s",
              show_default=True,
              help="What a numeric timestamp counts since the epoch (an ISO 8601 time is "
                   "read as written); seconds past the year 5000 are refused with a hint.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Set a detector key for this run: threshold, below, baseline, "
                   "sensitivity, memory, hold, season, min_change (repeatable).")
def backtest(file: Any, kind: str | None, detector_name: str | None, config_path: str | None,
             output: Any, threshold: float | None, below: bool, unit: str,
             settings: tuple[str, ...]) -> None:
    """Replay FILE (CSV: timestamp,value) through a detector's scoring and the mission
    engine, offline, as the daemon would.

    Writes timestamp,value,anomaly_score,is_anomaly,mission_opened: one row per input
    row, in order; a summary (anomalies, missions, score distribution) goes to stderr.
    """
    from .backtest import BacktestError, apply_settings, detector_for_kind, run_backtest
    from .config import Config, MissionsConfig

    if (kind is None) == (detector_name is None):
        raise click.UsageError("give exactly one of --kind or --detector")
    missions = MissionsConfig()
    if kind is not None:
        det = detector_for_kind(kind)
    else:
        cfg = _load(config_path)
        assert isinstance(cfg, Config)
        found = [d for d in cfg.detector if d.name == detector_name]
        if not found:
            names = ", ".join(d.name for d in cfg.detector) or "none"
            _fail(f"no detector {detector_name!r} in {cfg.source} (detectors: {names})",
                  DaemonExit.CONFIG)
        det = found[0]
        missions = cfg.missions
    det = apply_settings(det, threshold, below, settings)
    try:
        summary = run_backtest(file, file.name, det, output, sys.stderr.isatty(), missions,
                               unit)
    except BacktestError as exc:
        _fail(str(exc), DaemonExit.ERROR)
    for line in summary.lines(det.name):
        click.echo(line, err=True)


def main() -> None:
    # SIGHUP reloads once graced serves; before that (and after) it must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # pragma: no cover
        click.echo(exc.format_message(), err=True)
        sys.exit(DaemonExit.USAGE)
    except click.UsageError as exc:
        exc.show()
        sys.exit(DaemonExit.USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(DaemonExit.ERROR)
    except click.exceptions.Abort:
        sys.exit(DaemonExit.ERROR)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
