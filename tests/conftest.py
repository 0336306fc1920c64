"""Fixtures shared by test files."""
import warnings

import pytest
import torch

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """The engine tests' problems are tiny: thread start-up would dominate, and on a busy machine two
    intra-op threads stall each other. Restored afterwards for the other test files."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def quiet_opacus():
    """Opacus's hooks warn that no input requires grad; irrelevant to the equality tests."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
