"""The default baseline on real, labelled data (NAB's dev split, beside the clone in CI).

A regression guard, not the issue's target: bench/nab_dev.py prints the figures, this
test checks they are printed, scored by the split's own scorer, and at least the targets
of #16 (standard 66, reward_low_FP 58, reward_low_FN 70; graced 0.1.0 scored 0.0).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SHARED = Path(os.environ.get("GRACE_SHARED_DIR", ROOT.parent / "shared"))
NAB = SHARED / "datasets" / "nab-dev"


@pytest.mark.slow
def test_nab_dev_scores_of_the_default_baseline() -> None:
    if not (NAB / "score.py").is_file():
        why = (f"no NAB dev split at {NAB} (CI puts shared/ beside the clone; "
               "GRACE_SHARED_DIR points elsewhere)")
        if os.environ.get("CI") == "true":  # CI must run it, as it runs the nspawn check
            pytest.fail(f"cannot run under CI: {why}")
        pytest.skip(why)
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "nab_dev.py"), "--data",
                          str(NAB), "--no-corpus"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = {line[:28].strip(): line[28:].split() for line in res.stdout.splitlines()
            if len(line) > 28}
    mine = [float(x) for x in rows["graced baseline (this tree)"]]
    assert rows["HTM (numenta)"] == ["65.8", "58.2", "70.3"]
    assert "28 series, 272544 rows" in res.stdout
    # standard, reward_low_FP, reward_low_FN: at least the targets (#16).
    assert mine[0] >= 66.0 and mine[1] >= 58.0 and mine[2] >= 70.0, res.stdout
