"""What an operator following the docs sees: escalated missions stay in view and in
status until their symptom clears; the log tells the remediation story."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Graced
from tests.helpers.procs import LineCollector, poll_until
from tests.test_missions_e2e import MISSIONS, Watch


def _hot(file: Path, playbook: str = "") -> str:
    return (f'[[detector]]\nname = "hot"\nkind = "value"\nfile = "{file}"\n'
            'threshold = 50.0\ninterval = 0.2\n' + playbook + MISSIONS.format(flap=0.0))


def _cooling(file: Path, risk: str = "low", budget: int = 1) -> str:
    """A playbook that really mends the value, ``budget`` times an hour at most."""
    return (f'[[playbook]]\nname = "cool-down"\ndetector = "hot"\nrisk = "{risk}"\n'
            f'budget = {budget}\nverify_timeout = 20.0\n\n'
            '[[playbook.step]]\naction = "run"\n'
            f'argv = ["sh", "-c", "echo 10 > \\"$0\\"", "{file}"]\ntimeout = 10.0\n')


def _ls(g: Graced) -> list[dict]:
    return json.loads(g.ctl("missions", "ls", "--json", check=True).stdout)


@pytest.mark.slow
def test_an_escalated_mission_stays_in_view_until_its_symptom_clears(make_graced,
                                                                     shortdir: Path) -> None:
    value = shortdir / "value"
    value.write_text("90\n")
    g = make_graced(detectors=_hot(value, _cooling(value)))
    w = Watch(g)
    recovered = LineCollector(g.ctl_popen("tail", "--json", "--since", "1",
                                          "detector.recovered"))
    w.wait("mission.resolved", "hot", 30)
    value.write_text("90\n")  # back again: the budget (1 an hour) is spent
    escalated = w.wait("mission.escalated", "hot", 30)["payload"]
    assert "budget spent" in escalated["reason"]

    listed = _ls(g)
    assert [(m["id"], m["state"]) for m in listed] == [(escalated["id"], "escalated")]
    human = g.ctl("missions", "ls")
    assert [line.split()[:3] for line in human.stdout.splitlines()[2:]] == [
        [str(escalated["id"]), "medium", "escalated"]]
    st = g.ctl("status")
    assert st.returncode == 7, st
    assert f"1 escalated (needs a person): mission #{escalated['id']}" in st.stdout
    assert json.loads(g.ctl("status", "--json").stdout)["escalated"] == [escalated["id"]]
    assert f"mission {escalated['id']} escalated (needs a person)" in g.stderr()

    # The person mends it: once the detector sees it normal, nobody is needed any more.
    assert recovered.wait_for(lambda ls: len(ls) >= 1, 10)
    value.write_text("10\n")
    assert recovered.wait_for(lambda ls: len(ls) >= 2, 30), recovered.lines
    assert _ls(g) == []
    assert g.ctl("status").returncode == 0
    assert [m["state"] for m in w.missions("hot")] == ["escalated", "resolved"]


@pytest.mark.slow
def test_the_log_tells_the_remediation_story_escaped_without_library_noise(
        make_graced, shortdir: Path) -> None:
    """At info: opened, awaiting approval, approved by whom, executing which playbook,
    resolved, rejected by whom; a subject with terminal escapes is escaped; at debug no
    trio-websocket frame lines."""
    value = shortdir / "v\x1b]0;owned\x07"
    value.write_text("90\n")
    toml_path = str(value).replace("\x1b", "\\u001b").replace("\x07", "\\u0007")
    g = make_graced(extra_config='log_level = "debug"\n', detectors=_hot(
        Path(toml_path), _cooling(Path(toml_path), "high", 5)))
    w = Watch(g)
    first = w.wait("mission.awaiting_approval", "hot", 30)["payload"]["id"]
    res = g.ctl("missions", "approve", str(first), "--yes", "--comment", "go ahead")
    assert res.returncode == 0, res.stderr
    w.wait("mission.resolved", "hot", 30)
    value.write_text("90\n")
    second = w.wait("mission.awaiting_approval", "hot", 30, count=2)["payload"]["id"]
    assert g.ctl("missions", "reject", str(second), "--comment", "not now\x1b[2J").returncode == 0
    w.wait("mission.rejected", "hot", 10)
    assert g.stop() == 0

    lines = g.stderr().splitlines()
    story = [line.split(" ", 2)[1:] for line in lines if " missions: mission " in line]
    subject = str(shortdir) + "/v\\e]0;owned\\x07"
    ours = f"({'medium'}) hot {subject} at 90.0, above the threshold 50.0"  # said once
    assert story[:5] == [
        ["info", f"missions: mission {first} opened: {ours}"],
        ["info", f"missions: mission {first} awaiting approval: playbook cool-down (risk high)"
                 " needs an approval"],
        ["info", f"missions: mission {first} approved: approved by root: go ahead"],
        ["info", f"missions: mission {first} executing: playbook cool-down"],
        ["info", f"missions: mission {first} resolved: hot normal for 2 consecutive samples"],
    ], story
    assert ["info", f"missions: mission {second} rejected: rejected by root: not now\\e[2J"
            ] in story
    assert not [line for line in lines if "\x1b" in line or "\x07" in line]
    assert not [line for line in lines if "trio-websocket" in line or "wsproto" in line]


@pytest.mark.slow
def test_a_rejection_holds_across_a_restart_until_the_symptom_clears(make_graced,
                                                                     shortdir: Path) -> None:
    """A person rejected the plan; graced restarts (every upgrade does) while the symptom
    is still there: nobody is asked again. Once it is seen normal and comes back, a new
    mission asks again."""
    value = shortdir / "value"
    value.write_text("90\n")
    g = make_graced(detectors=_hot(value, _cooling(value, "high", 5)))
    w = Watch(g)
    waiting = w.wait("mission.awaiting_approval", "hot", 30)["payload"]["id"]
    assert g.ctl("missions", "reject", str(waiting), "--comment", "leave it").returncode == 0
    w.wait("mission.rejected", "hot", 10)
    w.close()
    head = json.loads(g.ctl("status", "--json", check=True).stdout)["head_seq"]
    assert g.stop() == 0
    g.start()

    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", str(head + 1),
                                     "detector.*", "mission.*", "daemon.heartbeat"))

    def after(topic: str, seq: int = 0) -> list[dict]:
        return [e for e in tail.events() if e["topic"] == topic and e["seq"] > seq
                and e["payload"].get("detector", "hot") == "hot"]

    # The detector judged the symptom after the restart (its first anomaly), and every
    # event up to a later heartbeat has arrived: no mission opened for it.
    assert tail.wait_for(lambda _: bool(after("detector.anomaly")), 30), tail.lines[-3:]
    seen = after("detector.anomaly")[0]["seq"]
    assert tail.wait_for(lambda _: bool(after("daemon.heartbeat", seen)), 30)
    assert [e["topic"] for e in tail.events() if e["topic"].startswith("mission.")] == []
    assert _ls(g) == [] and g.ctl("status").returncode == 0

    value.write_text("10\n")
    assert tail.wait_for(lambda _: bool(after("detector.recovered")), 30)
    value.write_text("90\n")
    assert tail.wait_for(lambda _: bool(after("mission.awaiting_approval")), 30)
    assert after("mission.awaiting_approval")[0]["payload"]["id"] == waiting + 1


@pytest.mark.slow
def test_an_expired_approval_keeps_graced_degraded_until_the_symptom_clears(
        make_graced, shortdir: Path) -> None:
    """Nobody approved or rejected within approval_timeout and the symptom is still there:
    no new mission opens, so graced must not go quiet. status says which mission and
    that nobody decided (exit 7, -q too), missions ls keeps it in view, the notifier is
    told it expired (default on); all until the symptom is seen normal."""
    value, notes = shortdir / "value", shortdir / "notes"
    value.write_text("90\n")
    notifier = ('\n[[notifier]]\nname = "file"\nkind = "command"\n'
                f'argv = ["sh", "-c", "cat >> \\"$0\\"; echo >> \\"$0\\"", "{notes}"]\n')
    g = make_graced(detectors=_hot(value, _cooling(value, "high", 5))
                    + "\n[remediation]\napproval_timeout = 2.0\n" + notifier)
    w = Watch(g)
    waiting = w.wait("mission.awaiting_approval", "hot", 30)["payload"]["id"]
    w.wait("mission.expired", "hot", 30)

    said = f"1 expired, nobody decided, symptom still there (no new mission while it " \
           f"lasts): mission #{waiting}"
    st = g.ctl("status")
    assert st.returncode == 7, (st.returncode, st.stdout, st.stderr)
    health = [line for line in st.stdout.splitlines() if line.split()[:1] == ["health"]]
    assert len(health) == 1 and said in " ".join(health[0].split()), st.stdout
    assert "1 expired, nobody decided (needs a person)" in " ".join(st.stdout.split())
    assert g.ctl("status", "-q").returncode == 7
    js = json.loads(g.ctl("status", "--json").stdout)
    assert js["expired"] == [waiting] and js["held"] == [] and js["degraded"] == [said]

    assert [(m["id"], m["state"]) for m in _ls(g)] == [(waiting, "expired")]
    row = g.ctl("missions", "ls", "--wide", check=True).stdout.splitlines()[2:]
    assert len(row) == 1 and row[0].split()[:3] == [str(waiting), "medium", "expired"], row
    assert "expired: no approval before it expired" in row[0], row

    def told() -> list[str]:
        return [json.loads(line)["mission"]["state"]
                for line in notes.read_text().splitlines() if line.strip()]
    poll_until(lambda: notes.exists() and len(told()) >= 2, 15, "the notifier told twice")
    assert told() == ["awaiting_approval", "expired"]

    # A restart (an upgrade) keeps it: graced saw nothing while it was stopped.
    w.close()
    assert g.stop() == 0
    g.start()
    assert g.ctl("status").returncode == 7
    assert json.loads(g.ctl("status", "--json").stdout)["expired"] == [waiting]

    # The person mends it: once the detector sees it normal, nobody is needed any more.
    recovered = LineCollector(g.ctl_popen("tail", "--json", "--since", "1",
                                          "detector.recovered"))
    value.write_text("10\n")
    assert recovered.wait_for(lambda ls: len(ls) >= 1, 30), recovered.lines
    recovered.proc.terminate()
    assert _ls(g) == []
    st = g.ctl("status")
    assert st.returncode == 0, st.stdout
    assert "expired" not in st.stdout


@pytest.mark.slow
def test_a_hold_of_a_detector_disabled_while_graced_was_stopped_ends_at_start(
        make_graced, shortdir: Path) -> None:
    """An expired approval holds its symptom (degraded); the operator disables that
    detector and restarts graced: nothing will ever sample it again, so nothing is held
    and graced is not degraded for it forever."""
    value = shortdir / "value"
    value.write_text("90\n")
    g = make_graced(detectors=_hot(value, _cooling(value, "high", 5))
                    + "\n[remediation]\napproval_timeout = 1.0\n")
    w = Watch(g)
    waiting = w.wait("mission.expired", "hot", 30)["payload"]["id"]
    w.close()
    assert json.loads(g.ctl("status", "--json").stdout)["expired"] == [waiting]
    assert g.stop() == 0
    g.config.write_text(g.config.read_text().replace('name = "hot"\n',
                                                     'name = "hot"\nenabled = false\n'))
    g.start()
    st = g.ctl("status", "--json")
    assert st.returncode == 0, st.stdout
    assert json.loads(st.stdout)["expired"] == [] and _ls(g) == []
