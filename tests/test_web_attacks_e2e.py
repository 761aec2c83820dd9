"""``gracectl web`` against other local users and a hostile path to graced, each attack
real: another Unix user reading every process's command line, a service worker planted
by another server that had the relay's address, a proxy that withholds or delays the
stream, and idle connections holding the relay's slots. Headless Chromium where the page
matters, as in tests/test_web_e2e.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio_websocket

from tests.helpers.browser import ARGS, Browser, chromium, ensure_chromium
from tests.helpers.procs import LineCollector, poll_until, tcp_listener
from tests.helpers.users import ensure_user
from tests.test_learning_e2e import FAULT, NORMAL, SETTINGS, fix, playbook, value_detector
from tests.test_stream_e2e import _proxy
from tests.test_web_e2e import Relay, _banner_class, _verified

OTHER = "grace-outsider"
# The other user cannot enter the tree's venv: the system's interpreter (stdlib only).
PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)),
              sys.executable)
TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


@pytest.fixture
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second Unix user and act as it")


def _as_other(code: str, *args: str, timeout: float = 60) -> str:
    """Run Python ``code`` as the other local user (no rights on graced or its files)."""
    got = subprocess.run(["runuser", "-u", OTHER, "--", PYTHON, "-I", "-c", code,
                          *args], capture_output=True, text=True, timeout=timeout,
                         cwd="/", stdin=subprocess.DEVNULL)
    assert got.returncode == 0, got.stderr
    return got.stdout


async def _sign_in(port: int, first: dict) -> tuple[int | None, str | None]:
    """A WebSocket to the relay that presents ``first``: (0, its first message) or the
    close (code, reason)."""
    async with trio_websocket.open_websocket_url(
            f"ws://127.0.0.1:{port}/ws",
            extra_headers=[("Origin", f"http://127.0.0.1:{port}")]) as ws:
        try:
            await ws.send_message(json.dumps(first))
            return 0, str(await ws.get_message())
        except trio_websocket.ConnectionClosed as exc:
            return exc.reason.code, exc.reason.reason


SCAN = r"""
import json, os, re
found, files = [], []
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        continue
    for arg in argv:
        found += re.findall(r"[A-Za-z0-9_-]{43}", arg)
        if "gracectl-web" in arg:
            path = arg.split("file://", 1)[-1]
            try:
                open(path, "rb").read()
                files.append([path, "read"])
            except OSError as exc:
                files.append([path, exc.strerror])
print(json.dumps({"candidates": sorted(set(found)), "files": files}))
"""


@pytest.mark.slow
def test_another_user_finds_no_usable_token_and_a_used_token_is_refused(
        make_graced, shortdir: Path) -> None:
    """``gracectl web`` opens a real (headless) Chromium as the default browser. Another
    user reads every command line on the host meanwhile: the token is on none (the
    browser got a launcher file only its user can read), nothing found there opens a
    session, and once the page has signed in, the URL's token itself is refused."""
    _need_root()
    binary, _ = ensure_chromium()
    ensure_user(OTHER)
    g = make_graced()
    profile = shortdir / "profile"
    pidfile = shortdir / "browser.pid"
    wrapper = shortdir / "grace-test-browser"  # a name webbrowser maps to no known browser
    wrapper.write_text("#!/bin/sh\necho $$ > " + str(pidfile) + "\nexec " + binary + " "
                       + " ".join([*ARGS, f"--user-data-dir={profile}"]) + ' "$@"\n')
    wrapper.chmod(0o755)
    proc = subprocess.Popen([g.ctl_argv0(), "web"], env={**g.env, "BROWSER": str(wrapper)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    out = LineCollector(proc)
    try:
        assert out.wait_for(lambda lines: any(x.startswith("http") for x in lines), 20)
        url = next(x for x in out.lines if x.startswith("http"))
        token = url.split("token=")[1].split("&")[0]
        port = int(url.split("/#")[0].rsplit(":", 1)[1])
        poll_until(pidfile.exists, 20, "the browser started")
        browser_pid = int(pidfile.read_text())
        argv = Path(f"/proc/{browser_pid}/cmdline").read_bytes().decode().split("\0")
        launcher = [a for a in argv if a.startswith("file://")]
        assert launcher and token not in " ".join(argv), argv
        assert oct(Path(launcher[0][7:]).stat().st_mode & 0o777) == "0o600"
        assert out.wait_for(lambda lines: any("signed in with the login token" in x
                                              for x in lines), 30), "the page never signed in"
        seen = json.loads(_as_other(SCAN))
        assert token not in seen["candidates"]
        for path, how in seen["files"]:
            assert how != "read", f"{OTHER} read {path}"
        for candidate in seen["candidates"][:50]:
            assert trio.run(_sign_in, port, {"token": candidate})[0] == 4001, candidate
        for pid in os.listdir("/proc"):  # as root: no command line at all holds it
            try:
                assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
            except OSError:
                continue
        assert not Path(launcher[0][7:]).parent.exists()  # gone once spent
        assert trio.run(_sign_in, port, {"token": token}) == (
            4001, "bad, spent or missing login token")
    finally:
        proc.terminate()
        proc.wait(10)
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), 15)
            except ProcessLookupError:
                pass
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_the_token_buys_one_session_which_a_reload_keeps(make_graced,
                                                          browser: Browser) -> None:
    g = make_graced()
    relay = Relay(g)
    try:
        b = browser
        b.driver.get(relay.url)
        _verified(b)
        b.driver.refresh()  # the same tab: its session, not the spent token
        _verified(b)
        b.driver.execute_script("window.open('about:blank')")
        b.driver.switch_to.window(b.driver.window_handles[-1])
        b.driver.get(relay.url)  # the printed URL again, in another tab: spent
        b.wait(lambda: "spent" in b.text("banner"), 10, "spent token refused")
        assert b.js("return window.grace.verified") == 0
        # A reload would present the same spent token: the banner says what does work.
        assert "Run gracectl web again for a new URL." in b.text("banner")
        assert "Reload" not in b.text("banner")
        # graced stops under the first tab's session: the relay closes that page and
        # keeps serving (the second tab's refused connections had been counted and
        # uncounted meanwhile; closing the session once crashed the relay on that).
        b.driver.switch_to.window(b.driver.window_handles[0])
        g.stop()
        b.wait(lambda: "Disconnected" in b.text("banner"), 15, "the page saw graced go")
        base = relay.url.split("#")[0]
        page = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", base],
                              capture_output=True, text=True, timeout=10).stdout
        assert page == "200"
        assert relay.proc.poll() is None
        # graced back: the page reconnects by itself with its session, and the stream it
        # resumes continues the chain it verified (seq and prev checked as ever).
        before = b.js("return window.grace.lastSeq")
        assert "Reconnecting" in b.text("banner")
        g.start()
        b.wait(lambda: b.js("return window.grace.reconnects") == 1
               and b.js("return window.grace.lastSeq") > before, 30, "reconnected")
        _verified(b)
        assert b.js("return window.grace.failure") is None
    finally:
        relay.close()
    assert relay.proc.stderr is not None
    assert "Traceback" not in relay.proc.stderr.read()


EVIL_SW = """
self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (e) => e.waitUntil(self.clients.claim()));
const PAGE = `<!doctype html><title>Grace</title><div id=banner class="banner green">Verified</div>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const ws = new WebSocket("ws://" + location.host + "/ws"); let n = 0; const waiters = {};
const call = (method, params) => new Promise((res) => { const id = ++n; waiters[id] = res;
  ws.send(JSON.stringify({id, nonce: "0".repeat(31) + id, method, params})); });
ws.onmessage = (e) => { for (const l of e.data.split("\\\\n")) { const f = JSON.parse(l);
  if (waiters[f.id]) waiters[f.id](f); } };
ws.onopen = async () => { ws.send(JSON.stringify({token}));
  const list = await call("missions.list", {all: true});
  for (const m of list.result.missions) if (m.state === "awaiting_approval") {
    const full = (await call("missions.get", {id: m.id})).result.mission;
    await call("missions.approve", {id: m.id, opened: m.opened_at, plan: full.plan.sha256,
      comment: "approved by a planted service worker"}); } };
</script>`;
self.addEventListener("fetch", (e) => {
  if (e.request.mode === "navigate") {
    e.respondWith(new Response(PAGE, {headers: {"Content-Type": "text/html"}}));
  }
});
"""
EVIL_PAGE = ('<!doctype html><title>innocent</title><p id=s>registering</p><script>'
             'navigator.serviceWorker.register("/sw.js", {scope: "/"}).then(() => '
             'navigator.serviceWorker.ready).then(() => {'
             'document.getElementById("s").textContent = "planted"; });</script>')


def _site(shortdir: Path, worker: str) -> Path:
    """The other user's web site: a page that registers ``worker`` for its whole origin."""
    if os.geteuid() == 0:
        ensure_user(OTHER)
    site = shortdir / "site"
    site.mkdir()
    (site / "index.html").write_text(EVIL_PAGE)
    (site / "sw.js").write_text(worker)
    site.chmod(0o755)
    shortdir.chmod(0o755)  # the other user serves it
    return site


def _plant(b: Browser, site: Path, port: int) -> None:
    """Another user's web server on 127.0.0.1:``port`` registers its service worker in
    this browser (as any page the operator visits there may), then goes away."""
    server = subprocess.Popen(
        (["runuser", "-u", OTHER, "--"] if os.geteuid() == 0 else [])
        + [PYTHON, "-I", "-m", "http.server", "--bind", "127.0.0.1",
           "--directory", str(site), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        poll_until(lambda: _listening(port), 10, f"the other server on {port}")
        b.driver.get(f"http://127.0.0.1:{port}/")
        b.wait(lambda: b.text("s") == "planted", 10, f"service worker planted on {port}")
        b.driver.get("about:blank")  # a later URL on this origin is a new page load
    finally:
        server.terminate()
        server.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_a_service_worker_planted_on_an_old_address_gets_nothing(
        make_graced, browser: Browser, shortdir: Path) -> None:
    """A worker registered by another user's server on the old default port and on the
    port the previous run used (free again once it stopped) does not control the next
    run's page: the page is the relay's, it verifies, and the mission awaiting approval
    is not approved by the worker's page."""
    site = _site(shortdir, EVIL_SW)
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + playbook("drain", "backlog", "high", fix(queue))
                    + SETTINGS.format(approval=120.0))
    previous = Relay(g, port=None)  # as the operator runs it: the default port
    old_port = int(previous.url.split("/#")[0].rsplit(":", 1)[1])
    previous.close()
    b = browser
    planted = {old_port} | (set() if _listening(8765) else {8765})  # the old default too
    for port in sorted(planted):
        _plant(b, site, port)
    queue.write_text(FAULT)
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "mission.awaiting_*"))
    assert tail.wait_for(lambda _: bool(tail.events()), 15), "no mission awaits approval"
    mid = tail.events()[0]["payload"]["id"]
    tail.proc.terminate()
    tail.proc.wait(10)
    relay = Relay(g, port=None)
    try:
        b.driver.get(relay.url)
        _verified(b)
        assert b.js("return navigator.serviceWorker.controller") is None
        b.wait(lambda: b.js("return document.querySelector(`[data-mission='${arguments[0]}']`)",
                            mid), 10, "the mission's card")
        shown = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
        assert shown["state"] == "awaiting_approval" and not shown["approvals"]
        assert queue.read_text().strip() == FAULT
        assert int(relay.url.split("/#")[0].rsplit(":", 1)[1]) not in planted
        b.screenshot("web-planted-worker-missed")
    finally:
        relay.close()


PASSING_SW = """
self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (e) => e.waitUntil(self.clients.claim()));
self.addEventListener("fetch", (e) => e.respondWith(fetch(e.request)));
"""


@pytest.mark.slow
def test_the_page_refuses_to_start_under_a_service_worker(make_graced, browser: Browser,
                                                          shortdir: Path) -> None:
    """A fixed --port reuses an origin: a worker planted there that passes the relay's
    page through (and could change it) finds the page refusing to start: red banner,
    nothing sent, so the token is not spent; the worker is unregistered."""
    site = _site(shortdir, PASSING_SW)
    g = make_graced()
    free = tcp_listener()
    port = free.getsockname()[1]
    free.close()
    b = browser
    _plant(b, site, port)
    relay = Relay(g, port=port)
    try:
        b.driver.get(relay.url)
        b.wait(lambda: "red" in _banner_class(b), 10, "red banner")
        assert "service worker the relay did not serve" in b.text("banner")
        b.wait(lambda: b.js("return navigator.serviceWorker.getRegistrations()"
                            ".then((r) => r.length)") == 0, 10, "worker unregistered")
        token = relay.url.split("token=")[1].split("&")[0]
        code, first = trio.run(_sign_in, port, {"token": token})  # nothing spent it
        assert code == 0 and json.loads(str(first))["relay"] == "session"
        b.screenshot("web-under-a-worker")
    finally:
        relay.close()


@pytest.mark.slow
def test_the_relay_answers_a_service_worker_check_by_clearing_the_origin(make_graced) -> None:
    g = make_graced()
    relay = Relay(g)
    try:
        base = relay.url.split("#")[0].rstrip("/")
        got = subprocess.run(["curl", "-sS", "-i", "-H", "Service-Worker: script",
                              base + "/sw.js"], capture_output=True, text=True,
                             timeout=10).stdout
        assert got.startswith("HTTP/1.1 404") and 'Clear-Site-Data: "storage"' in got, got
        got = subprocess.run(["curl", "-sS", "-i", base + "/anything.js"],
                             capture_output=True, text=True, timeout=10).stdout
        assert got.startswith("HTTP/1.1 404") and 'Clear-Site-Data: "storage"' in got, got
    finally:
        relay.close()
    assert relay.proc.stderr is not None
    assert "service worker ('/sw.js') that this relay never served" in relay.proc.stderr.read()


def _staleness(b: Browser) -> str:
    return b.text("banner") if "amber" in _banner_class(b) else ""


@pytest.mark.slow
def test_a_stream_that_never_brings_an_event_turns_amber(make_graced,
                                                        browser: Browser) -> None:
    g = make_graced()  # heartbeats every 0.5 s: stale after 3 x 0.5 + 1 s
    proxy, path = _proxy(g, "withhold", 0)  # responses pass, events never
    relay = Relay(g, "--socket", path, "--key", str(g.state / "key.pub"))
    try:
        b = browser
        b.driver.get(relay.url)
        b.wait(lambda: b.js("return window.grace.kid") is not None, 15, "key trusted")
        b.wait(lambda: "STALE: no frame" in _staleness(b), 10, "amber banner")
        assert b.js("return window.grace.verified") == 0
        b.screenshot("web-withheld-from-start")
    finally:
        relay.close()
        proxy.kill()
        proxy.wait()


@pytest.mark.slow
def test_a_steadily_delayed_stream_turns_amber(make_graced, browser: Browser) -> None:
    g = make_graced()
    proxy, path = _proxy(g, "delay", 4)  # every event 4 s late, responses on time
    relay = Relay(g, "--socket", path, "--key", str(g.state / "key.pub"))
    try:
        b = browser
        b.driver.get(relay.url)
        b.wait(lambda: b.js("return window.grace.verified") > 5, 20, "events verified")
        b.wait(lambda: "behind the daemon's clock" in _staleness(b), 5, "amber banner")
        lag = int(b.text("banner").split(" s behind")[0].rsplit(" ", 1)[1])
        assert 3 <= lag <= 6, b.text("banner")
        b.screenshot("web-delayed")
    finally:
        relay.close()
        proxy.kill()
        proxy.wait()


HOG = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
held, lived = {}, []
end = time.monotonic() + seconds
while time.monotonic() < end:
    while len(held) < 70:
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        held[s] = time.monotonic()
    if not lived:
        print("open", flush=True)
    for s, since in list(held.items()):
        try:
            if s.recv(1) == b"":
                lived.append(time.monotonic() - since)
                s.close()
                del held[s]
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            del held[s]
    time.sleep(0.05)
print(max(lived, default=0.0), flush=True)
"""


@pytest.mark.slow
def test_another_users_idle_connections_neither_last_nor_lock_the_page_out(
        make_graced) -> None:
    _need_root()
    ensure_user(OTHER)
    g = make_graced()
    relay = Relay(g)
    base = relay.url.split("#")[0].rstrip("/")
    port = int(base.rsplit(":", 1)[1])
    hog = subprocess.Popen(["runuser", "-u", OTHER, "--", PYTHON, "-I", "-c", HOG,
                            str(port), "8"], stdout=subprocess.PIPE, text=True, cwd="/",
                           stdin=subprocess.DEVNULL)
    assert hog.stdout is not None
    try:
        assert hog.stdout.readline().strip() == "open"  # its 70 connections are open
        for _ in range(5):
            page = subprocess.run(["curl", "-sS", "-m", "3", "-o", "/dev/null", "-w",
                                   "%{http_code}", base + "/"], capture_output=True, text=True,
                                  timeout=10)
            assert page.stdout == "200", page
        token = relay.url.split("token=")[1].split("&")[0]
        code, first = trio.run(_sign_in, port, {"token": token})
        assert code == 0 and json.loads(str(first))["relay"] == "session"
        lines = hog.communicate(timeout=30)[0].split()
        longest = float([x for x in lines if x != "open"][-1])
        # 2 s at the relay, plus the hog's own polling on a loaded host; the old relay
        # kept each for 10 s (past the hog's 8 s: none was ever closed).
        assert 1.5 <= longest <= 5.0, f"an idle connection lived {longest:.2f} s"
    finally:
        hog.kill()
        hog.wait(10)
        relay.close()
