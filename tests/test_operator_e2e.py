"""What an operator following the docs sees: escalated missions stay in view and in
status until their symptom clears; the log tells the remediation story."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Graced
from tests.helpers.procs import LineCollector
from tests.test_missions_e2e import MISSIONS, Watch


def _hot(file: Path, playbook: str = "") -> str:
    return (f'[[detector]]\nname = "hot"\nkind = "value"\nfile = "{file}"\n'
            'threshold = 50.0\ninterval = 0.2\n' + playbook + MISSIONS.format(flap=0.0))


def _cooling(file: Path, extra: str = "") -> str:
    """A low-risk playbook that really mends the value, once an hour at most."""
    return ('[[playbook]]\nname = "cool-down"\ndetector = "hot"\nrisk = "low"\n'
            f'budget = 1\nverify_timeout = 20.0\n{extra}\n'
            '[[playbook.step]]\naction = "run"\n'
            f'argv = ["sh", "-c", "echo 10 > {file}"]\ntimeout = 10.0\n')


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
