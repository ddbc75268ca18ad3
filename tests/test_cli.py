"""The command's own behaviour, in-process: its arguments, its messages, its start."""

from __future__ import annotations

import sys

import pytest

from batchrun._cli import main


@pytest.mark.parametrize(("given", "share"), [("1%", 0.01), ("0.5 %", 0.005), ("0.01", 0.01), ("0", 0.0)])
def test_max_failed_share_takes_a_fraction_or_a_percentage(given: str, share: float) -> None:
    from batchrun._cli import _share

    assert _share(given) == pytest.approx(share)


@pytest.mark.parametrize("given", ["one percent", "150%", "-0.1"])
def test_a_share_that_is_no_share_says_what_is_expected(given: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "job.yaml", "--max-failed-share", given])
    assert info.value.code == 2
    said = capsys.readouterr().err
    assert "argument --max-failed-share: expected a share" in said and "_share" not in said


def test_ctrl_c_while_the_command_loads_ends_quietly(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    class Interrupted:  # a key press while the heavy modules are imported
        def find_spec(self, name: str, path: object, target: object = None) -> None:
            if name == "batchrun._cli":
                raise KeyboardInterrupt

    from batchrun.__main__ import main as command

    monkeypatch.delitem(sys.modules, "batchrun._cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    assert command() == 3
    assert capsys.readouterr().err == "batchrun: interrupted while starting; nothing was sent\n"


def test_sigterm_while_the_command_loads_ends_it_with_exit_3(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A scheduler's stop that lands in the imports: exit 3 as for one during the run, not death by the signal."""
    import os
    import signal

    class Terminated:  # the signal arrives while the heavy modules are imported
        def find_spec(self, name: str, path: object, target: object = None) -> None:
            if name == "batchrun._cli":
                # (unhandled, it would end this test process, not fail the test)
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "no handler while loading"
                os.kill(os.getpid(), signal.SIGTERM)

    from batchrun.__main__ import main as command

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.delitem(sys.modules, "batchrun._cli")
    monkeypatch.setattr(sys, "meta_path", [Terminated(), *sys.meta_path])
    try:
        assert command() == 3
    finally:
        signal.signal(signal.SIGTERM, before)
    assert capsys.readouterr().err == "batchrun: interrupted while starting; nothing was sent\n"


@pytest.mark.slow
def test_importing_batchrun_loads_neither_pyarrow_nor_httpx() -> None:
    import subprocess

    code = "import sys, batchrun; print(sorted(m for m in ('pyarrow', 'httpx', 'anyio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_a_live_run_loads_no_http_library_it_does_not_send_with(tmp_path) -> None:
    """httpx (80 ms), aiohttp (0.1 s), jsonschema, Jinja2 and, without a bar, tqdm stay out of a plain job's start."""
    import subprocess

    from tests.conftest import TEST_KEY, cli_env, write_jsonl, write_spec
    from tests.fakeserver import FakeServer, Faults

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    code = ("import sys; from batchrun._cli import main; main(sys.argv[1:]); "
            "print(sorted(m for m in ('httpx', 'aiohttp', 'jsonschema', 'jinja2', 'tqdm') if m in sys.modules))")
    with FakeServer(Faults()) as server:
        spec = write_spec(tmp_path, api={"base_url": server.base_url})
        result = subprocess.run([sys.executable, "-c", code, "run", str(spec), "--no-progress"], capture_output=True,
                                text=True, env=cli_env(OPENAI_API_KEY=TEST_KEY), timeout=120)
        assert len(server.requests) == 1
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


@pytest.mark.slow
def test_output_piped_into_a_reader_that_leaves_early_is_no_internal_error(tmp_path) -> None:
    import subprocess

    from tests.conftest import REPO, write_jsonl, write_spec

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})
    # `true` reads nothing and leaves: the plan meets a closed pipe (or, if it was quicker, a
    # pipe that takes it)
    run = subprocess.run(f"{sys.executable} -m batchrun plan {spec} | true; echo \"${{PIPESTATUS[0]}}\"",
                         shell=True, executable="/bin/bash", capture_output=True, text=True, cwd=REPO)
    assert run.stdout.strip() in ("0", "141"), run
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
