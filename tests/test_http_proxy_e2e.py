"""The http probe and proxies: a proxy set in graced's environment never stands between
the probe and a loopback service; with proxy = "env" it carries the rest, except what
no_proxy names; by default (proxy = "none") no proxy is used at all. Real servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graced.httpc import proxy_for
from tests.test_security_e2e import _server


def _http(name: str, url: str, proxy: str | None = None) -> str:
    return (f'[[detector]]\nname = "{name}"\nkind = "http"\nurl = "{url}"\ninterval = 0.3\n'
            f"timeout = 1.0\n" + (f'proxy = "{proxy}"\n' if proxy else ""))


@pytest.mark.slow
def test_a_proxy_in_the_environment_never_hides_a_local_service(
        make_graced, shortdir: Path) -> None:
    svc, svc_port, svc_hits = _server(shortdir, "svc", "http", "200", "")
    proxy, proxy_port, proxy_hits = _server(shortdir, "proxy", "http", "200", "")
    try:
        dets = (_http("local", f"http://127.0.0.1:{svc_port}/health", "env")
                + _http("localname", f"http://localhost:{svc_port}/named", "env")
                + _http("remote", "http://grace-probe.invalid/via-proxy", "env")
                + _http("skipped", "http://skip.invalid/direct", "env")
                + _http("plain", "http://grace-probe.invalid/plain"))
        g = make_graced(detectors=dets, start=False)
        g.env_extra = {"http_proxy": f"http://127.0.0.1:{proxy_port}",
                       "HTTP_PROXY": f"http://127.0.0.1:{proxy_port}",
                       "no_proxy": "skip.invalid"}
        g.start()
        # skipped and plain go straight to a host that does not exist: each fails, and
        # by then every detector has sampled (all start together, 0.3 s apart).
        tail = g.ctl_popen("tail", "--since", "1", "-o", "json", "detector.anomaly")
        failed: set[str] = set()
        assert tail.stdout is not None
        for line in tail.stdout:
            failed.add(json.loads(line)["payload"]["detector"])
            if {"skipped", "plain"} <= failed:
                break
        tail.kill()
        tail.wait()
        states = json.loads(g.ctl("detectors", "--json", check=True).stdout)
        for name in ("local", "localname", "remote"):
            (sample,) = states[name]["subjects"].values()
            assert sample is not None and not sample["anomalous"], (name, sample)
        assert failed.isdisjoint({"local", "localname", "remote"})
        hits = proxy_hits.read_text().splitlines()
        assert "GET http://grace-probe.invalid/via-proxy" in hits
        assert not [h for h in hits if "127.0.0.1" in h or "localhost" in h or
                    "skip.invalid" in h or "/plain" in h], hits
        direct = svc_hits.read_text().splitlines()
        assert "GET /health" in direct and "GET /named" in direct
    finally:
        for p in (svc, proxy):
            p.kill()
            p.wait()


def test_which_proxy() -> None:
    env = {"http_proxy": "http://p:3128", "https_proxy": "http://s:3128",
           "no_proxy": "corp.example, 10.0.0.0/8,.internal,db:5432"}
    assert proxy_for("http://example.org/", "none", env) is None
    assert proxy_for("http://example.org/", "env", env) == "http://p:3128"
    assert proxy_for("https://example.org/", "env", env) == "http://s:3128"
    for local in ("http://127.0.0.1:8080/", "http://localhost/", "http://[::1]:80/",
                  "http://127.9.9.9/", "http://app.localhost/"):
        assert proxy_for(local, "env", env) is None, local
        assert proxy_for(local, "http://explicit:1", env) is None, local
    for named in ("http://corp.example/", "http://a.corp.example/", "http://10.1.2.3/",
                  "http://x.internal/", "http://db:5432/"):
        assert proxy_for(named, "env", env) is None, named
    assert proxy_for("http://db:80/", "env", env) == "http://p:3128"
    assert proxy_for("http://example.org/", "env", {**env, "no_proxy": "*"}) is None
    assert proxy_for("http://example.org/", "http://explicit:1", env) == "http://explicit:1"
