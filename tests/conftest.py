"""Fixtures shared by test files."""
import pytest

from dpmem.bench import cli
# A digits run small enough for seconds: 24 models per variant, one DP variant.
TINY_DIGITS = ["dataset=digits", "models=24", "unit_size=24", "epochs=3", "epsilons=4", "hidden=16", "threads=1"]


@pytest.fixture(scope="session")
def tiny_digits_run(tmp_path_factory):
    """A finished digits run (images) with its galleries and report.html; returns (run_dir, stderr)."""
    import contextlib
    import io
    out = tmp_path_factory.mktemp("digits") / "tiny"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["run", "--out", str(out), "--quiet", *TINY_DIGITS]) == 0
    return out, err.getvalue()
