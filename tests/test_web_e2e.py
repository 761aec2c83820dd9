"""Mission Control in a real browser: headless Chromium (Debian's) driven by Selenium,
against a real graced through the real ``gracectl web`` relay. A real fault shows up as a
card, a tampering proxy turns the banner red and freezes the view, an approval from the
page runs a high-risk playbook, and the integration map follows a probe down and up.
Screenshots are saved under test-artifacts/."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import trio
import trio_websocket

from gracectl.web import check_page_request
from graced.protocol import parse_ts
from tests.conftest import Graced
from tests.helpers.browser import Browser, chromium
from tests.helpers.procs import LineCollector, tcp_listener
from tests.helpers.users import ensure_user
from tests.test_documented_e2e import APPROVER, GROUP
from tests.test_learning_e2e import FAULT, NORMAL, SETTINGS, fix, playbook, value_detector
from tests.test_stream_e2e import _proxy


class Relay:
    """``gracectl web`` as a user runs it, on a free port (``port=None``: the default);
    its URL from stdout. ``user``: setpriv's arguments to run it as another Unix user."""

    def __init__(self, g: Graced, *args: str, port: int | None = 0,
                 user: list[str] | None = None) -> None:
        argv = [g.ctl_argv0(), *args, "web", *(["--port", str(port)] if port is not None
                                               else []), "--no-open"]
        self.proc = subprocess.Popen(
            ["setpriv", *user, *argv] if user else argv, env=g.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), (self.url, self.proc.stderr)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


def _follow(g: Graced, pattern: str) -> LineCollector:
    """``gracectl tail`` from the next event on (wherever the head is when it connects)."""
    head = json.loads(g.ctl("status", "--json", check=True).stdout)["head_seq"]
    return LineCollector(g.ctl_popen("tail", "--json", "--since", str(head + 1), pattern))


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _verified(b: Browser) -> None:
    b.wait(lambda: b.js("return document.getElementById('banner').className") == "banner green"
           and b.js("return window.grace.verified") > 0, 15, "page verified")


def _component(b: Browser, name: str) -> str | None:
    return b.js("const e = document.querySelector(`[data-component='${arguments[0]}']`);"
                "return e ? e.dataset.state : null", name)


def _card_state(b: Browser, mission: int) -> str | None:
    return b.js("const e = document.querySelector(`[data-mission='${arguments[0]}']`);"
                "return e ? e.dataset.state : null", mission)


def _nothing_left_the_machine(b: Browser, relay: Relay) -> None:
    """Every request the page and its Worker made went to the relay on loopback. (Chromium
    itself still calls home for updates and accounts despite the flags; the NetLog tells
    those apart: their initiator is not the page.)"""
    origin = relay.url.split("/#")[0]
    requests = b.finish()
    page = [url for initiator, url in requests if initiator == origin]
    assert f"{origin.replace('http', 'ws')}/ws" in page  # the Worker's socket is seen
    assert {f"{origin}/{f}" for f in ("app.js", "worker.js", "verify.js")} <= set(page)
    assert Browser.leaving(requests, origin) == []


def test_page_requests_are_checked_before_they_reach_graced() -> None:
    plan = "a" * 64
    ok, _ = check_page_request(json.dumps({"id": 1, "nonce": "n", "method": "missions.approve",
                                           "params": {"id": 3, "opened": 1.5, "plan": plan}}))
    assert ok is not None
    # The time it opened as a new mission.* event's payload writes it: the same.
    iso, _ = check_page_request(json.dumps({"id": 1, "nonce": "n", "method": "missions.reject",
                                            "params": {"id": 3,
                                                       "opened": "2026-12-01T21:00:00.000000Z"}}))
    assert iso is not None
    for req, why in [
        ({"method": "pause"}, "not served"),
        ({"method": "emit", "params": {"topic": "user.x"}}, "not served"),
        ({"method": "missions.approve", "params": {"id": 3, "opened": 1.5}}, "full SHA-256"),
        ({"method": "missions.approve", "params": {"id": 3, "opened": 1.5, "plan": plan[:12]}},
         "full SHA-256"),
        ({"method": "missions.reject", "params": {"id": 3}}, "opened time"),
        ({"method": "missions.reject", "params": {"id": 3, "opened": "yesterday"}},
         "opened time"),
        ({"method": "missions.reject", "params": {"id": 3, "opened": True}}, "opened time"),
        ({"method": "status", "params": []}, "params"),
    ]:
        got, reason = check_page_request(json.dumps(req))
        assert got is None and why in reason, (req, reason)
    assert check_page_request("[1]")[0] is None
    assert check_page_request("{" * 100)[0] is None
    assert "too large" in check_page_request(json.dumps({"method": "status",
                                                         "x": "y" * 70000}))[1]


@pytest.mark.slow
def test_a_real_fault_is_a_card_within_a_second_and_the_map_follows_the_probe(
        make_graced, browser: Browser) -> None:
    server = tcp_listener()
    port = server.getsockname()[1]
    g = make_graced(detectors=f'[[detector]]\nname = "api"\nkind = "tcp"\ninterval = 0.3\n'
                              f'host = "127.0.0.1"\nport = {port}\ntimeout = 1.0\n'
                              '\n[missions]\nresolve_after = 1\nflap_window = 0\n')
    relay = Relay(g)
    tail = _follow(g, "mission.opened")
    try:
        b = browser
        b.driver.get(relay.url)
        _verified(b)
        b.wait(lambda: _component(b, "detector:api") == "up", 10, "probe shown up")
        assert "#" not in b.driver.current_url, "the token stays in the address bar"
        assert b.text("key").startswith(json.loads(
            g.ctl("status", "--json", check=True).stdout)["kid"])
        b.screenshot("web-loaded")

        server.close()  # a real fault: the service's port refuses connections
        assert tail.wait_for(lambda _: bool(tail.events()), 10), "no mission.opened"
        opened = tail.events()[0]
        mid = opened["payload"]["id"]
        b.wait(lambda: _card_state(b, mid) is not None, 5, "mission card")
        # The card names detector/subject once; its summary does not repeat the subject.
        summary = b.js("return document.querySelector(arguments[0]).textContent",
                       f"[data-mission='{mid}'] .summary")
        assert f"127.0.0.1:{port}" not in summary and "refused" in summary.lower(), summary
        shown_ms = b.js("return window.grace.shownAt[arguments[0]]", mid)
        lag = shown_ms / 1000 - _epoch(opened["ts"])
        assert lag <= 1.0, f"card drawn {lag:.3f} s after mission.opened"
        b.wait(lambda: _component(b, "detector:api") == "failing", 5, "probe shown failing")
        err = b.js("return document.querySelector(\"[data-component='detector:api'] .err\")"
                   ".textContent")
        assert "refused" in err.lower(), err
        # The detail view: timeline, and the chart drawn by the page.
        b.driver.find_element("css selector", f"[data-mission='{mid}']").click()
        b.wait(lambda: b.js("return !!document.querySelector('#detail svg.chart')"), 5,
               "detail chart")
        assert "opened" in b.text("detail")
        b.screenshot("web-fault-card")

        server = tcp_listener(port)  # the service is back
        b.wait(lambda: _component(b, "detector:api") == "up", 10, "probe shown up again")
        b.wait(lambda: _card_state(b, mid) == "resolved", 15, "card resolved")
        b.screenshot("web-probe-back")
        assert b.console_errors() == []
        _nothing_left_the_machine(b, relay)
    finally:
        server.close()
        relay.close()
        tail.proc.terminate()
        tail.proc.wait(10)


@pytest.mark.slow
def test_a_frame_altered_on_its_way_turns_the_banner_red_and_freezes_the_view(
        make_graced, browser: Browser, shortdir: Path) -> None:
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue))
    head = json.loads(g.ctl("status", "--json", check=True).stdout)["head_seq"]
    target = head + 100  # among the events emitted below, after the page is up
    proxy, path = _proxy(g, "alter", target)
    relay = Relay(g, "--socket", path, "--key", str(g.state / "key.pub"))
    try:
        b = browser
        b.driver.get(relay.url)
        _verified(b)
        g.ctl("emit", "user.load", "--count", "150", check=True)
        b.wait(lambda: "red" in b.js("return document.getElementById('banner').className"),
               10, "red banner")
        banner = b.text("banner")
        assert f"seq {target}" in banner and "bad signature" in banner, banner
        assert b.js("return window.grace.lastSeq") == target - 1
        b.screenshot("web-tampered")
        # Frozen: a mission opens and the daemon says so, the page shows nothing of it.
        tail = _follow(g, "mission.opened")
        queue.write_text(FAULT)
        assert tail.wait_for(lambda _: bool(tail.events()), 10), tail.lines
        tail.proc.terminate()
        tail.proc.wait(10)
        assert b.js("return document.querySelectorAll('[data-mission]').length") == 0
        assert b.js("return window.grace.lastSeq") == target - 1
        assert f"seq {target}" in b.text("banner")
    finally:
        relay.close()
        proxy.kill()
        proxy.wait()


@pytest.mark.slow
def test_approving_from_the_page_runs_the_high_risk_playbook_and_the_card_resolves(
        make_graced, browser: Browser, shortdir: Path) -> None:
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + playbook("drain", "backlog", "high", fix(queue))
                    + SETTINGS.format(approval=120.0))
    relay = Relay(g)
    try:
        b = browser
        b.driver.get(relay.url)
        _verified(b)
        queue.write_text(FAULT)
        b.wait(lambda: b.js("return document.querySelector(\"[data-state='awaiting_approval'] "
                            "[data-action='approve']\")"), 10, "approve button")
        mid = b.js("return Number(document.querySelector(\"[data-state='awaiting_approval']\")"
                   ".dataset.mission)")
        assert queue.read_text().strip() == FAULT  # nothing ran by itself: high risk waits
        b.driver.find_element(
            "css selector", f"[data-mission='{mid}'] [data-action='approve']").click()
        confirm = b.wait(lambda: b.driver.find_elements(
            "css selector", f"[data-mission='{mid}'] [data-action='confirm']"), 5, "confirm")
        plan = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)[
            "plan"]["sha256"]
        assert plan[:12] in confirm[0].text  # the operator confirms the plan they see
        b.screenshot("web-approve")
        confirm[0].click()
        b.wait(lambda: _card_state(b, mid) == "resolved", 20, "card resolved")
        assert queue.read_text().strip() == NORMAL  # the playbook really ran
        shown = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
        assert shown["state"] == "resolved"
        assert shown["approvals"][0]["plan_sha256"] == plan
        assert shown["approvals"][0]["comment"] == "approved in the browser"
        assert shown["approvals"][0]["uid"] == os.getuid()  # the relay user's rights
        b.screenshot("web-resolved")
        # The closed mission's detail at 800x600: the step's duration, a chart of the
        # mission's own window, and nothing wider than the window.
        b.driver.set_window_size(800, 600)
        b.driver.find_element("css selector", f"[data-mission='{mid}']").click()
        b.wait(lambda: b.js("return !!document.querySelector('#detail svg.chart')"), 5,
               "detail chart")
        ran = shown["steps"][0]
        assert f"exit {ran['exit_code']} in {ran['duration_s']:.2f} s" in b.text("detail")
        t0, t1 = b.js("const c = document.querySelector('#detail svg.chart');"
                      "return [Number(c.dataset.t0), Number(c.dataset.t1)]")
        opened_at, closed_at = parse_ts(shown["opened_at"]), parse_ts(shown["closed_at"])
        margin = max(10, (closed_at - opened_at) * 0.25)
        assert t0 == pytest.approx(opened_at - margin)
        assert t1 == pytest.approx(closed_at + margin)
        # Its "opened" and "resolved" labels (seconds apart) do not overlap; a time axis.
        boxes = b.js("return ['opened', 'closed'].map((c) => { const r = document"
                     ".querySelector('#detail svg.chart text.' + c).getBoundingClientRect();"
                     " return [r.left, r.top, r.right, r.bottom]; })")
        (l0, t_0, r0, b0), (l1, t_1, r1, b1) = boxes
        assert r0 <= l1 or r1 <= l0 or b0 <= t_1 or b1 <= t_0, boxes
        assert len(b.driver.find_elements("css selector", "#detail svg.chart text.time")) == 3
        b.driver.execute_script("document.getElementById('detail').scrollIntoView()")
        b.wait(lambda: b.js("return document.documentElement.scrollWidth <= innerWidth"), 5,
               "no horizontal overflow at 800x600")
        b.screenshot("web-detail-800x600")
        # Words, not raw JSON: the learning events in Activity, the Knowledge panel, and
        # how the key came to be trusted.
        b.wait(lambda: "learning.pattern_learned" in b.text("feed"), 10, "learned in feed")
        feed = b.text("feed")
        assert "{" not in feed, feed
        assert "drain on backlog" in feed and "expected success" in feed, feed
        assert "memory consulted" in feed, feed
        b.wait(lambda: "1 patterns learned" in b.text("knowledge"), 10, "knowledge panel")
        assert "success 100 %" in b.text("knowledge"), b.text("knowledge")
        assert "_" not in b.text("knowledge"), b.text("knowledge")
        assert "given: passed in the URL by gracectl web" in b.text("key")
        assert b.console_errors() == []
        _nothing_left_the_machine(b, relay)
    finally:
        relay.close()


def _banner_class(b: Browser) -> str:
    return str(b.js("return document.getElementById('banner').className"))


@pytest.mark.slow
def test_a_withheld_stream_turns_amber(make_graced, browser: Browser) -> None:
    g = make_graced()  # heartbeats every 0.5 s: stale after 3 x 0.5 + 1 s of silence
    head = json.loads(g.ctl("status", "--json", check=True).stdout)["head_seq"]
    proxy, path = _proxy(g, "cut", head + 8)  # forwards nothing after it, stays connected
    relay = Relay(g, "--socket", path, "--key", str(g.state / "key.pub"))
    try:
        b = browser
        b.driver.get(relay.url)
        _verified(b)
        b.wait(lambda: "amber" in _banner_class(b), 10, "amber banner")
        assert "STALE" in b.text("banner")
        assert b.js("return window.grace.lastSeq") == head + 8
        b.screenshot("web-stale")
    finally:
        relay.close()
        proxy.kill()
        proxy.wait()


@pytest.mark.slow
def test_a_daemon_with_another_key_is_refused_loudly(make_graced, shortdir: Path,
                                                      browser: Browser) -> None:
    free = tcp_listener()
    port = free.getsockname()[1]
    free.close()
    first = make_graced()
    relay = Relay(first, port=port)
    b = browser
    try:
        b.driver.get(relay.url)
        _verified(b)  # the browser pins this daemon's key for 127.0.0.1:port
    finally:
        relay.close()
    (shortdir / "other").mkdir()
    other = Graced(shortdir / "other")  # another daemon: a key of its own
    other.start()
    relay = Relay(other, port=port)
    try:
        b.driver.get(relay.url)
        b.wait(lambda: "red" in _banner_class(b), 10, "red banner")
        assert "KEY CHANGED" in b.text("banner")
        assert b.js("return window.grace.verified") == 0
        assert b.js("return document.querySelectorAll('[data-component]').length") == 0
        b.screenshot("web-key-changed")
    finally:
        relay.close()
        other.close()


def _approve_on_page(b: Browser, relay: Relay) -> int:
    """Open the page, approve the mission awaiting approval (both clicks); its id."""
    b.driver.get(relay.url)
    _verified(b)
    b.wait(lambda: b.js("return document.querySelector(\"[data-state='awaiting_approval'] "
                        "[data-action='approve']\")"), 10, "approve button")
    mid = int(b.js("return Number(document.querySelector(\"[data-state='awaiting_approval']\")"
                   ".dataset.mission)"))
    b.driver.find_element(
        "css selector", f"[data-mission='{mid}'] [data-action='approve']").click()
    b.wait(lambda: b.driver.find_elements(
        "css selector", f"[data-mission='{mid}'] [data-action='confirm']"), 5, "confirm")[0].click()
    return mid


@pytest.mark.slow
def test_the_page_has_the_relay_users_rights_and_no_more(make_graced, browser: Browser,
                                                         shortdir: Path) -> None:
    """A relay run by a user who may read but not approve: the page's approval is refused
    by graced and nothing runs; the same page through a relay run by a member of
    approver_groups approves, and the plan runs."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create second Unix users and act as them")
    outsider = ensure_user("grace-outsider")
    member = ensure_user(APPROVER, (GROUP,))
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(extra_config="", detectors=value_detector("backlog", queue, "high")
                    + playbook("drain", "backlog", "high", fix(queue))
                    + SETTINGS.format(approval=120.0).replace(
                        "[remediation]\n", f'[remediation]\napprover_groups = ["{GROUP}"]\n'))
    os.chmod(g.socket, 0o666)  # anyone may read: the approval rules alone decide
    os.chmod(g.base, 0o755)
    os.chmod(g.home, 0o777)
    key = g.base / "daemon.pub"  # the state dir is graced's alone
    key.write_bytes((g.state / "key.pub").read_bytes())
    key.chmod(0o644)
    queue.write_text(FAULT)
    plain = ["--regid", "nogroup", "--clear-groups"]
    relay = Relay(g, "--key", str(key), user=["--reuid", outsider, *plain])
    try:
        mid = _approve_on_page(browser, relay)
        b = browser
        b.wait(lambda: "refused: not_authorised" in b.text("message"), 10, "refusal shown")
        who = f"{outsider} (uid {pwd.getpwnam(outsider).pw_uid})"
        assert f"{who} may not approve" in b.text("message")
        b.screenshot("web-not-authorised")
        shown = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
        assert shown["state"] == "awaiting_approval" and not shown["approvals"]
        assert queue.read_text().strip() == FAULT
    finally:
        relay.close()
    relay = Relay(g, "--key", str(key), user=["--reuid", member, "--regid", "nogroup",
                                              "--init-groups"])
    try:
        assert _approve_on_page(browser, relay) == mid
        browser.wait(lambda: _card_state(browser, mid) == "resolved", 20, "card resolved")
        shown = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
        assert shown["approvals"][0]["uid"] == pwd.getpwnam(member).pw_uid
        assert queue.read_text().strip() == NORMAL
    finally:
        relay.close()


@pytest.mark.slow
def test_the_relay_wants_the_token_the_host_and_the_origin(make_graced) -> None:
    g = make_graced()
    relay = Relay(g)
    try:
        base = relay.url.split("#")[0].rstrip("/")
        port = int(base.rsplit(":", 1)[1])
        page = subprocess.run(["curl", "-sS", "-i", base + "/"], capture_output=True,
                              text=True, timeout=10).stdout
        assert "Content-Security-Policy: default-src 'none'; script-src 'self'" in page
        assert "<script type=\"module\" src=\"app.js\"></script>" in page
        assert "<script>" not in page  # no inline script
        rebound = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                  "-H", f"Host: evil.example:{port}", base + "/"],
                                 capture_output=True, text=True, timeout=10).stdout
        assert rebound == "403"
        cross = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Connection: Upgrade",
             "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13",
             "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "-H", "Origin: http://evil.example", base + "/ws"],
            capture_output=True, text=True, timeout=10).stdout
        assert cross == "403"

        async def with_token(token: str) -> tuple[int | None, str | None]:
            async with trio_websocket.open_websocket_url(
                    f"ws://127.0.0.1:{port}/ws",
                    extra_headers=[("Origin", f"http://127.0.0.1:{port}")]) as ws:
                try:
                    await ws.send_message(json.dumps({"token": token}))
                    await ws.send_message(json.dumps({"id": 1, "nonce": "n", "method": "hello"}))
                    return 0, await ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    return exc.reason.code, exc.reason.reason

        assert trio.run(with_token, "not-the-token") == (4001, "bad, spent or missing login token")

        def raw(data: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
                conn.sendall(data)
                got = b""
                while chunk := conn.recv(65536):
                    got += chunk
                return got

        assert raw(b"GET /" + b"a" * 20000 + b"\r\n").startswith(b"HTTP/1.1 431 ")
        assert raw(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").startswith(b"HTTP/1.1 405")
        assert raw(b"\x00\xff\r\n\r\n").startswith(b"HTTP/1.1 405")
        assert raw(f"GET /../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
                   .encode()).startswith(b"HTTP/1.1 404")
        token = relay.url.split("token=")[1].split("&")[0]
        code, first = trio.run(with_token, token)
        assert code == 0 and json.loads(str(first))["relay"] == "session"
        # Good once: the token is spent, a copy of it read later opens nothing.
        assert trio.run(with_token, token) == (4001, "bad, spent or missing login token")
    finally:
        relay.close()


@pytest.mark.slow
def test_with_no_browser_to_open_web_says_so_in_one_line(graced: Graced,
                                                         shortdir: Path) -> None:
    """The default --open on a server with no browser (no display, none on PATH): the URL
    on stdout, then one line on stderr saying none could be opened, and the launcher file
    (it holds the token) is not left behind."""
    bare = shortdir / "bare-path"
    bare.mkdir()
    env = {k: v for k, v in graced.env.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
    env["PATH"] = str(bare)  # no www-browser, lynx, w3m, xdg-open...
    runtime = Path(env["XDG_RUNTIME_DIR"])
    runtime.mkdir(parents=True, exist_ok=True)
    out = LineCollector(subprocess.Popen(
        [graced.ctl_argv0(), "web"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True))
    try:
        said = "gracectl: no browser could be opened; open the URL above"
        assert out.wait_for(lambda ls: said in ls, 30)
        urls = [i for i, line in enumerate(out.lines) if line.startswith("http://127.0.0.1:")]
        assert len(urls) == 1 and urls[0] < out.lines.index(said), out.lines
        assert out.lines.count(said) == 1
        assert not list(runtime.glob("gracectl-web-*"))
    finally:
        out.proc.terminate()
        out.wait_exit(10)
