"""Reload: read the config again and apply it to the running daemon, or keep the old one.

SIGHUP, ``systemctl reload graced`` (the unit's ExecReload= runs ``gracectl reload``) and
``gracectl reload`` all come here. The file is found, parsed and checked as at start.
Keys only a restart can apply (the socket, listeners, state dir, the journal's
synchronous and batch_max) must be unchanged; the TLS certificate and key are loaded
again (a renewed certificate at the same path is served to new connections). On
success detectors, playbooks, notifiers, remediation, learning, missions, retention
limits, heartbeat and log level change in place: no client is dropped, no state is
lost; the missions of a removed detector, and those of a changed detector on a subject
it no longer reports, close (expired) saying so, unless a playbook step is running for
them.
``daemon.config_reloaded`` carries the file's SHA-256; on any error
``daemon.config_rejected`` carries the reason and the running config stays.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from . import logs
from .config import EMBEDDED, Config, ConfigError, DetectorConfig, load_config
from .config.daemon import SECTIONS
from .config.file import locate as find_config
from .detectors.runner import DetectorRunner
from .errors import StartupError
from .executor import Executor
from .learning import Learning
from .mesh import Mesh
from .missions.engine import MissionEngine
from .redact import redact_text

log = logging.getLogger("graced.reload")

# Keys that only a restart applies: [section] -> keys.
RESTART_ONLY = {
    "daemon": ("state_dir", "socket", "socket_mode", "socket_group", "listen", "allowed_origins",
               "max_request_bytes", "client_queue", "client_queue_bytes", "send_timeout"),
    "journal": ("synchronous", "batch_max"),
    "fleet": ("url", "stream", "creds", "nkey_seed", "user", "password", "tls_ca", "tls_cert",
              "tls_key", "replicas", "max_age_days", "max_bytes_per_host", "in_flight",
              "ack_timeout", "share_knowledge", "knowledge_keys", "knowledge_interval"),
}


def reports(cfg: DetectorConfig, subject: str) -> bool:
    """Whether detector ``cfg`` can report ``subject``: every kind reports its one subject,
    except systemd, one per failed unit its ``units`` names or globs match (all if none)."""
    if cfg.kind == "systemd":
        return not cfg.units or any(fnmatch.fnmatchcase(subject, g) for g in cfg.units)
    return subject == cfg.effective_subject


def removed_reason(detector: str) -> str:
    """Why a mission of a detector a reload removed expired (graced reads it at start)."""
    return f"detector {detector} was removed from the config"


def lost_subject_reason(detector: str, subject: str) -> str:
    """Why a mission expired when a reload changed its detector so that it no longer
    reports that subject (graced reads it at start: such an expiry holds nothing)."""
    return f"detector {detector} no longer reports subject {subject} (its config changed)"


class ConfigRejected(Exception):
    """The new config was refused; the message is the reason (one line)."""


def _named(old: list[Any], new: list[Any]) -> dict[str, list[str]]:
    """Added, changed and removed entries of a ``[[table]]`` (by name)."""
    before, after = {x.name: x for x in old}, {x.name: x for x in new}
    return {"added": [n for n in after if n not in before],
            "changed": [n for n in after if n in before and after[n] != before[n]],
            "removed": [n for n in before if n not in after]}


def changed_keys(old: list[Any], new: list[Any]) -> dict[str, list[str]]:
    """The keys of each changed ``[[table]]`` entry (by name) whose value differs: named,
    never their values (a notifier's URL or header may hold a secret)."""
    before = {x.name: x for x in old}
    return {x.name: [f.name for f in dataclasses.fields(x) if f.compare
                     and getattr(x, f.name) != getattr(before[x.name], f.name)]
            for x in new if x.name in before and x != before[x.name]}


def changes(old: Config, new: Config) -> dict[str, Any]:
    """What a reload changes, besides the detectors: playbooks and notifiers (by name),
    and the keys of each single table ([remediation] mode, approvers, keys ...)."""
    keys = {section: [f.name for f in dataclasses.fields(getattr(new, section))
                      if getattr(getattr(old, section), f.name)
                      != getattr(getattr(new, section), f.name)]
            for section in SECTIONS}
    return {"playbooks": _named(old.playbook, new.playbook),
            "notifiers": _named(old.notifier, new.notifier),
            "changed_keys": {what: changed_keys(getattr(old, table), getattr(new, table))
                             for what, table in (("detectors", "detector"),
                                                 ("playbooks", "playbook"),
                                                 ("notifiers", "notifier"))},
            "sections": {section: names for section, names in keys.items() if names}}


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The restart-only keys whose value differs between ``old`` and ``new``."""
    return [f"[{section}] {key}" for section, keys in RESTART_ONLY.items() for key in keys
            if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)]


def summary(result: dict[str, Any]) -> str:
    """One line naming every change a reload result records ("nothing changed")."""
    parts = []
    for what in ("detectors", "playbooks", "notifiers"):
        diff = result.get(what) or {}
        keys = (result.get("changed_keys") or {}).get(what) or {}
        # "changed scratch-disk (threshold)": each changed entry with its keys, as a
        # single table's ("[remediation] mode").
        done = "; ".join(f"{how} " + ", ".join(
            f"{n} ({', '.join(keys[n])})" if how == "changed" and keys.get(n) else n
            for n in names) for how, names in diff.items() if names)
        if done:
            parts.append(f"{what} {done}")
    parts += [f"[{section}] {', '.join(keys)}"
              for section, keys in (result.get("sections") or {}).items()]
    for what, label in (("replanned_missions", "plan changed for missions"),
                        ("closed_missions", "closed missions")):
        if result.get(what):
            parts.append(f"{label} {', '.join(map(str, result[what]))}")
    return "; ".join(parts) or "nothing changed"


class Reloader:
    """Applies a new config to the running components; one reload at a time."""

    def __init__(self, *, config: Config, locate: Callable[[], Path | None], mesh: Mesh,
                 engine: MissionEngine, runner: DetectorRunner, executor: Executor,
                 learning: Learning) -> None:
        self.config = config
        self.locate = locate
        self.mesh = mesh
        self.engine = engine
        self.runner = runner
        self.executor = executor
        self.learning = learning
        # Called with each applied config (the daemon and the API keep a reference).
        self.listeners: list[Callable[[Config], None]] = []
        # Loads the TLS certificate and key a config names (in a worker thread; raises
        # on a file it cannot load), returning what to apply and a digest of the files'
        # contents: a certificate renewed at the same path is applied too, as nginx does.
        self.load_tls: Callable[[Config], tuple[Callable[[], None], str]] | None = None
        self.tls_digest = ""
        self._lock = trio.Lock()

    async def reload(self, by: str) -> dict[str, Any]:
        """Re-read and apply the config; raises :class:`ConfigRejected` (old one kept)."""
        async with self._lock:
            try:
                path = self.locate()
                new = await trio.to_thread.run_sync(lambda: load_config(path))
                # Started on the embedded default: a file written since is not read (a
                # reload never reads another file), so say it needs a restart.
                written = None if path is not None else await trio.to_thread.run_sync(
                    lambda: find_config(None))
                if new.blank and self.config.source != EMBEDDED:
                    # An editor saving in place truncates first: never apply "nothing".
                    raise ConfigError(f"{new.source}: is empty (a save in progress?); the "
                                      "running config came from a file")
                changed = restart_only_changes(self.config, new)
                if changed:
                    raise ConfigError(f"{new.source}: {', '.join(changed)} changed: only a "
                                      "restart of graced applies that")
                tls = None
                if self.load_tls is not None:
                    load = self.load_tls
                    try:
                        tls = await trio.to_thread.run_sync(lambda: load(new))
                    except StartupError as exc:
                        raise ConfigError(f"{new.source}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - nothing in a file may stop graced
                reason = str(exc) if isinstance(exc, ConfigError) else (
                    f"cannot read the config: {type(exc).__name__}: {exc}")
                # Journaled and shown to readers: no URL credentials or query values.
                reason = redact_text(reason)
                log.warning("config rejected (%s), keeping the running one: %s", by, reason)
                # Not waiting on the commit: the answer must not hang on a full disk.
                self.mesh.publish_nowait("daemon.config_rejected", {
                    "by": by, "reason": reason, "running_sha256": self.config.digest})
                raise ConfigRejected(reason) from None
            tls_renewed = False
            if tls is not None:
                apply_tls, digest = tls
                apply_tls()
                tls_renewed = digest != self.tls_digest and self.config.daemon.tls_cert \
                    == new.daemon.tls_cert and self.config.daemon.tls_key == new.daemon.tls_key
                self.tls_digest = digest
            return await self._apply(new, by, tls_renewed, written)

    async def _apply(self, new: Config, by: str, tls_renewed: bool = False,
                     written: Path | None = None) -> dict[str, Any]:
        changed = changes(self.config, new)
        if tls_renewed:  # the same paths, new contents
            changed["sections"].setdefault("daemon", []).append("tls_cert/tls_key contents")
        diff = self.runner.reconfigure(list(new.detector))
        ex = self.executor
        ex.config, ex.playbooks, ex.notifiers = new.remediation, list(new.playbook), list(
            new.notifier)
        self.learning.config = new.learning
        mc = new.missions
        self.engine.resolve_after = mc.resolve_after
        self.engine.flap_window = mc.flap_window
        self.engine.update_interval = mc.update_interval
        logs.set_level(new.daemon.log_level)
        self.config = new
        for listener in self.listeners:
            listener(new)
        replanned = await self.executor.replan_waiting()
        closed = await self._close_missions_of(diff["removed"])
        for name in diff["removed"]:
            self.engine.forget_detector(name)
        closed += await self._close_missions_of_lost_subjects(
            {d.name: d for d in new.detector if d.name in diff["changed"]})
        warnings = list(new.warnings)
        if written is not None:
            warnings.append(
                f"a config file now exists at {written}, but graced started without one and "
                "runs the embedded default: restart graced to use it (a reload reads only "
                "the file found at start)")
        for warning in warnings:
            log.warning("%s", warning)
        # heartbeat_interval: a verifier's stale limit follows it (docs/protocol.md).
        payload = {"by": by, "source": new.source, "sha256": new.digest, "detectors": diff,
                   "heartbeat_interval": new.daemon.heartbeat_interval,
                   **changed, "replanned_missions": replanned, "closed_missions": closed,
                   "warnings": warnings, "restart_for": str(written) if written else None}
        payload["summary"] = summary(payload)
        log.info("config reloaded (%s): %s sha256 %s; %s", by, new.source,
                 new.digest[:12] or "-", payload["summary"])
        # Applied in memory already: the answer says so at once, even while the journal
        # cannot commit (a full disk); the event is committed with the next group.
        self.mesh.publish_nowait("daemon.config_reloaded", payload)
        return payload

    async def _close_missions_of_lost_subjects(self, changed: dict[str, DetectorConfig]
                                               ) -> list[int]:
        """Close the missions of changed detectors on a subject they no longer report (a
        ``file`` moved from o1 to o2: nothing would ever sample o1 again)."""
        closed = []
        now = time.time()
        for m in list(self.engine.active.values()):
            cfg = changed.get(m.detector)
            if cfg is None or reports(cfg, m.subject) or m.id in self.executor.running:
                continue
            await self.executor.record(self.engine.transition(
                m, "expired", now, lost_subject_reason(m.detector, m.subject)),
                durable=False)
            closed.append(m.id)
        for key in [k for k in self.engine.held if k[0] in changed
                    and not reports(changed[k[0]], k[1])]:
            self.engine.forget(key)
        return closed

    async def _close_missions_of(self, removed: list[str]) -> list[int]:
        """Close the missions of removed detectors, except those a step is running for."""
        closed = []
        now = time.time()
        for m in list(self.engine.active.values()):
            if m.detector in removed and m.id not in self.executor.running:
                await self.executor.record(self.engine.transition(
                    m, "expired", now, removed_reason(m.detector)),
                    durable=False)
                closed.append(m.id)
        return closed
