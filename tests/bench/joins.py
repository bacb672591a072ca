"""What the join tests of ``dms-perf report`` share: a bench output of cells to refuse, and the refusals."""

from __future__ import annotations

from dms_perf.bench import cli


def tiny_cells(out) -> None:
    """A bench output of one cell (tiny model, CPU): what a stream or capacity run must not join."""
    assert cli.main(["bench", "--model", "tiny", "--dtype", "float32", "--contexts", "16", "--new-tokens", "2",
                     "--methods", "dense-triton", "--repeats", "1", "--out", str(out)]) == 0


def assert_report_refuses(capsys, first, cases, out) -> None:
    """``dms-perf report first *inputs`` exits 2 with one line holding ``message``, no traceback, per case."""
    capsys.readouterr()
    for inputs, message in cases:
        assert cli.main(["report", str(first), *map(str, inputs), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
