"""A real graced with a TCP listener and a client key of this user's in its config."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import Graced


def keyed_daemon(make_graced: Any, role: str, extra: str = ""
                 ) -> tuple[Graced, int, dict[str, str], str]:
    """graced listening on 127.0.0.1 (a free port), with a key made by the real
    ``gracectl keys generate`` in ``[remediation] ROLE`` (read_keys, control_keys ...);
    ``extra`` goes into [daemon]. Returns the daemon, its TCP port, gracectl's
    environment for TCP (no socket; the daemon's key trusted) and the key's line."""
    g = make_graced(start=False, extra_config=f'listen = ["127.0.0.1:0"]\n{extra}'
                    f'[remediation]\n{role} = ["KEY"]\n')
    line = g.ctl("keys", "generate", check=True).stdout.strip()
    g.config.write_text(g.config.read_text().replace('"KEY"', json.dumps(line)))
    g.start()
    port = json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["tcp_ports"][0]
    env = {k: v for k, v in g.env.items() if k != "GRACE_SOCKET"}
    env["GRACE_KEY"] = str(g.state / "key.pub")
    return g, int(port), env, line
