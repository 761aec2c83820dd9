"""URL redaction by value: what is hidden, and that nothing else changes (a playbook's
argument that merely looks like a URL must reach the step as written)."""

from __future__ import annotations

import pytest

from graced.redact import HIDDEN, redact_text, redact_url


@pytest.mark.parametrize("url", [
    "A://0", "HTTP://Example.COM/Path", "http://[::1]:8080/x", "svc://db/Tables/Users",
])
def test_a_url_with_nothing_to_hide_is_left_as_written(url: str) -> None:
    assert redact_url(url) == url
    assert redact_text(f"see {url} now") == f"see {url} now"


@pytest.mark.parametrize(("url", "shown"), [
    ("http://admin:hunter2@db:5432/x", f"http://{HIDDEN}@db:5432/x"),
    ("HTTPS://h/p?token=abc&x", f"HTTPS://h/p?token={HIDDEN}&{HIDDEN}"),
    ("http://h/p#frag", f"http://h/p#{HIDDEN}"),
])
def test_secrets_are_hidden_and_the_rest_kept(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "hunter2" not in redact_text(f"error: {url}") and "abc" not in redact_url(url)


def test_path_parameters_and_secret_paths_are_hidden() -> None:
    from graced.redact import redact_url

    assert redact_url("http://h:1/p;jsessionid=S3CRET;flag/x") == \
        "http://h:1/p;jsessionid=REDACTED;REDACTED/x"
    hidden = redact_url("https://hooks.example/services/T0/B0/S3CRET", hide_path=True)
    assert hidden.startswith("https://hooks.example/REDACTED-") and "S3CRET" not in hidden
    assert hidden != redact_url("https://hooks.example/services/T0/B0/OTHER", hide_path=True)
