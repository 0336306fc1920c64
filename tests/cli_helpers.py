"""The command line run in-process, as the test files that check its output call it."""
import contextlib
import io

from dpmem.bench import cli


def run_cli(argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``dpmem ARGV``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()
