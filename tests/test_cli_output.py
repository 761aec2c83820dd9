"""The pure parts of gracectl's output: fitting, values, reasons, the clock, time specs."""

from __future__ import annotations

import os
import time
from datetime import datetime

import pytest

from gracectl import out, timespec


@pytest.fixture(autouse=True)
def settings(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(out, "SETTINGS", out.Settings())
    monkeypatch.delenv("NO_COLOR", raising=False)
    yield out.SETTINGS


def test_fit_cuts_with_an_ellipsis_from_either_end() -> None:
    assert out.fit("abcdef", 6) == "abcdef"
    assert out.fit("abcdef", 4) == "abc…"
    assert out.fit("/var/lib/app/cache-a", 8, keep_end=True) == "…cache-a"


def test_table_fits_the_width_and_spills_the_reason() -> None:
    cols = [out.Column("ID"), out.Column("SUBJECT", 1, 6, keep_end=True),
            out.Column("REASON", 1, 10, spill=True)]
    rows = [["1", "/var/lib/app/cache/one-long-name", "at 99.0, above the threshold 50.0"]]
    wide = out.table(rows, cols, width=None)
    assert "/var/lib/app/cache/one-long-name" in wide and "…" not in wide
    narrow = out.table(rows, cols, width=40).splitlines()
    assert all(len(line) <= 40 for line in narrow), narrow
    assert narrow[0].split() == ["ID", "SUBJECT"]
    assert narrow[-1] == out.SPILL_INDENT + "at 99.0, above the threshold 50.0"
    fits = out.table(rows, cols, width=80).splitlines()
    assert len(fits) == 3 and fits[-1].endswith("above the threshold 50.0")


def test_table_escapes_cells_and_colours_only_when_asked(settings: out.Settings) -> None:
    rows = [["\x1b]0;pwned\x07", out.Cell("high", "red")]]
    plain = out.table(rows, ["A", "B"], width=None)
    assert "\x1b" not in plain and "\\e]0;pwned\\x07" in plain
    settings.colour = "always"
    assert "\x1b[31mhigh\x1b[0m" in out.table(rows, ["A", "B"], width=None)
    os.environ["NO_COLOR"] = "1"
    try:  # a flag overrides NO_COLOR (no-color.org); auto obeys it
        assert "\x1b[31mhigh" in out.table(rows, ["A", "B"], width=None)
        settings.colour = "auto"
        assert not out.use_colour()
    finally:
        del os.environ["NO_COLOR"]


def test_values_are_written_as_json_writes_them() -> None:
    assert out.kv({"a": None, "b": True, "c": 1.5, "d": "x y", "e": "plain", "f": "",
                   "g": [1, "z"]}) == 'a=null b=true c=1.5 d="x y" e=plain f="" g=[1, "z"]'
    assert out.value('say "hi"') == '"say \\"hi\\""'


def test_reason_drops_what_the_row_shows() -> None:
    assert out.reason("memory at 93.1 %, above the threshold 90 %", "memory", "host") == \
        "at 93.1 %, above the threshold 90 %"
    assert out.reason("web /health: connection refused", "web", "/health") == \
        "connection refused"
    assert out.reason("something else", "web", "x") == "something else"


def test_one_clock(settings: out.Settings) -> None:
    epoch = 1_800_000_000.25
    local = out.when(epoch)
    assert datetime.fromisoformat(local).timestamp() == 1_800_000_000
    assert out.when("2027-01-15T08:00:00.250000Z") == out.when(epoch)
    settings.utc = True
    assert out.when(epoch) == "2027-01-15T08:00:00Z"
    assert out.when(epoch, ms=True) == "2027-01-15T08:00:00.250Z"
    assert out.when(None) == "-"


NOW = 1_800_000_000.0


@pytest.mark.parametrize("text, expected", [
    ("42", timespec.Point(seq=42)),
    ("now", timespec.Point(ts=NOW)),
    ("-10min", timespec.Point(ts=NOW - 600)),
    ("-1h 30min", timespec.Point(ts=NOW - 5400)),
    ("2h ago", timespec.Point(ts=NOW - 7200)),
    ("+90s", timespec.Point(ts=NOW + 90)),
    ("2027-01-15T08:00:00Z", timespec.Point(ts=NOW)),
    ("2027-01-15T09:00:00+01:00", timespec.Point(ts=NOW)),
])
def test_time_specs(text: str, expected: timespec.Point) -> None:
    assert timespec.parse(text, NOW) == expected


def test_time_specs_without_a_zone_are_local() -> None:
    local = time.strftime("%Y-%m-%d %H:%M", time.localtime(NOW))
    assert timespec.parse(local, NOW).ts == NOW - NOW % 60
    today = timespec.parse("today", NOW).ts
    assert today is not None and time.localtime(today)[3:6] == (0, 0, 0)
    assert timespec.parse("yesterday", NOW).ts == pytest.approx(today - 86400, abs=3600)


def test_journalctl_clock_and_epoch_forms() -> None:
    """22:31, 22:31:05, 'yesterday 22:00', 'today 08:00', @EPOCH (journalctl(1))."""
    today = timespec.parse("today", NOW).ts
    assert today is not None
    hm = time.strftime("%H:%M", time.localtime(NOW))
    hms = time.strftime("%H:%M:%S", time.localtime(NOW))
    assert timespec.parse(hm, NOW).ts == NOW - NOW % 60
    assert timespec.parse(hms, NOW).ts == NOW
    assert timespec.parse(f"today {hms}", NOW).ts == NOW
    yesterday = timespec.parse(f"yesterday {hm}", NOW).ts
    assert yesterday == pytest.approx(NOW - NOW % 60 - 86400, abs=3600)  # a DST change
    assert time.localtime(yesterday)[3:5] == time.localtime(NOW)[3:5]
    assert timespec.parse("@1796164260", NOW) == timespec.Point(ts=1796164260.0)
    assert timespec.parse("@1796164260.5", NOW) == timespec.Point(ts=1796164260.5)


@pytest.mark.parametrize("junk", ["", "0", "-", "-10 parsecs", "2027-13-45", "x" * 100,
                                  "-1e999min", "99999999999999999999999", "25:00",
                                  "12:60", "yesterday 24:00", "@", "@-5", "@1e9",
                                  "someday 10:00"])
def test_bad_time_specs_are_refused(junk: str) -> None:
    with pytest.raises(ValueError):
        timespec.parse(junk, NOW)


@pytest.mark.parametrize(("since", "until", "after"), [
    ("10", "5", True), ("5", "10", False), ("5", "5", False),
    ("now", "-1h", True), ("-1h", "now", False), ("today", "today", False),
    ("10", "now", False),  # a seq against a time: graced knows, not the command line
])
def test_since_after_until(since: str, until: str, after: bool) -> None:
    assert timespec.after(timespec.parse(since, NOW), timespec.parse(until, NOW)) is after


def test_a_spilled_reason_longer_than_the_terminal_wraps_whole_at_80() -> None:
    # The newcomer's row: the reason moved under it was still cut at 80 columns.
    why = ("no value yet: 44.34 % so far, averaged over 600 s once watched that long "
           "(412 s to go); mode: memcg-event")
    rows = [["memory", "memory", "up", "poll", "host", "44.34 %", "2s", why]]
    cols = [out.Column("DETECTOR", 2, 8), out.Column("KIND", 1, 6), out.Column("STATE", 1, 5),
            out.Column("MODE"), out.Column("SUBJECT", 3, 8, keep_end=True),
            out.Column("VALUE"), out.Column("SAMPLED"), out.Column("REASON", 1, 24, spill=True)]
    lines = out.table(rows, cols, width=80).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    under = lines[3:]
    assert len(under) == 2 and all(line.startswith(out.SPILL_INDENT) for line in under)
    assert "…" not in "".join(under)
    assert " ".join(line.strip() for line in under) == why  # every word, none split


@pytest.mark.parametrize(("number", "unit", "width", "shown"), [
    (1.0, "processes", 10, "1 process"), (3.0, "processes", 11, "3 processes"),
    (12.0, "processes", 10, "12 procs"), (1.507, "per core", 10, "1.507/core"),
    (1.0, "events", 10, "1 event"), (93.12, "%", 10, "93.12 %"),
    (12345.0, "requests/s", 10, "1.234e+04"), (0.5, "lines/s", 11, "0.5 lines/s"),
    (1234.0, "lines/s", 10, "1234 ln/s")])
def test_a_unit_is_abbreviated_or_dropped_never_cut(number: float, unit: str, width: int,
                                                    shown: str) -> None:
    assert out.quantity_in(number, unit, width) == shown
    assert out.quantity(1.0, "processes") == "1 process"
    assert out.quantity(2.0, "processes") == "2 processes"


def test_a_step_record_without_exit_code_error_or_duration_prints_no_none() -> None:
    """A newcomer saw Python's None in human output ('last value None', 'FAILED (None)');
    what a record does not hold is left out or said in words."""
    from gracectl.plan_text import no_value, step_result

    assert step_result({"ok": True, "exit_code": 0, "duration_s": 0.2}) == "ok, exit 0, 0.2 s"
    assert step_result({"ok": False, "error": "timed out after 5 s", "exit_code": None,
                        "duration_s": 5.0}) == "FAILED (timed out after 5 s), 5.0 s"
    assert step_result({"ok": False, "error": None, "exit_code": None,
                        "duration_s": None}) == "FAILED"
    assert (no_value(None), no_value(58.7), no_value(True)) == ("no value", "58.7", "true")


def test_playbooks_ls_at_80_never_cuts_the_name_others_give_way() -> None:
    """The newcomer's row ('restart-s…  detect…  low  run  1/3 per 3600s ...'): the name
    whole, the match whole under its row; a name too long for every column leaves RUNS
    and LAST RUN out, named for the caller's note."""
    from gracectl.playbooks import PLAYBOOK_COLUMNS

    row = ["restart-service", "detector=svc-health", "low", "run", "1/3 per 3600s", "100%",
           2, "1m52s ago"]
    lines = out.table([row], PLAYBOOK_COLUMNS, width=80).splitlines()
    assert all(len(x) <= 80 for x in lines), lines
    assert lines[2].split() == ["restart-service", "low", "run", "1/3", "per", "3600s", "100%",
                                "2", "1m52s", "ago"]
    assert lines[3] == out.SPILL_INDENT + "detector=svc-health"
    long = ["restart-the-billing-queue-worker", "detector=queue-depth", "high (approval)",
            "run,signal", "3/3 per 3600s", "50%", 4, "-"]
    dropped: list[str] = []
    lines = out.table([row, long], PLAYBOOK_COLUMNS, width=80, dropped=dropped).splitlines()
    assert all(len(x) <= 80 for x in lines), lines
    assert lines[0].split() == ["PLAYBOOK", "RISK", "STEPS", "BUDGET", "LEFT", "SUCCESS"]
    assert lines[4].startswith("restart-the-billing-queue-worker  high (approval)  run,…")
    assert dropped == ["RUNS", "LAST RUN"]
    assert "LAST RUN" in out.table([row, long], PLAYBOOK_COLUMNS, width=None)  # --wide


def test_a_plans_folded_lines_go_on_under_their_text() -> None:
    """missions show, approve and playbooks run fold a plan one way: each continuation
    under the text after its label ('plan: ', '1. run: ', 'values: ')."""
    from gracectl.plan_text import render_plan

    plan = {"playbook": "drain", "risk": "high", "sha256": "ab" * 32, "values": {
        "subject": "/var/lib/app/cache/worker-queue-long-name", "detector": "queue-depth"},
        "steps": [{"step": 1, "action": "run", "timeout": 5.0, "argv": [
            "/bin/sh", "-c", "exit 0", "--first-long-option=/var/lib/app/cache/one",
            "--second-long-option=/var/lib/app/cache/two"]}]}
    lines = out.fold("\n".join(render_plan(plan)), 80).splitlines()
    assert lines[:2] == ["plan: playbook drain (risk high), sha256", " " * 6 + "ab" * 32]
    assert lines[2].startswith("  1. run: argv [") and lines[3].startswith(" " * 10 + '"')
    values = next(i for i, x in enumerate(lines) if x.startswith("  values: "))
    assert lines[values + 1].startswith(" " * 10 + '"'), lines
    hung = out.fold("no label here " * 8, 40).splitlines()  # none: two spaces deeper
    assert len(hung) > 1 and all(x[:2] == "  " and x[2] != " " for x in hung[1:]), hung
