"""ghmpi.cli through real subprocesses: `python -m ghmpi ...` as a user (or mpirun) starts it."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ghmpi
from ghmpi.cli import RANK_ENV_VARS, default_config_path, main, world_rank
from ghmpi.config import Config, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def ghmpi_cmd(args: list[str], cwd: Path, env: dict[str, str] | None = None,
              pythonpath: Path = REPO) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in RANK_ENV_VARS}
    full_env["PYTHONPATH"] = str(pythonpath)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "ghmpi", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=60)


def assert_one_error_line(proc: subprocess.CompletedProcess[str], contains: str = "") -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ghmpi: error: ")
    assert contains in lines[0]
    assert proc.stdout == ""
    return lines[0]


def imported_after(call: str, cwd: Path) -> set[str]:
    """Heavy modules imported by `main([...])` in a fresh interpreter (SystemExit swallowed)."""
    script = (
        "import sys\nfrom ghmpi.cli import main\n"
        f"try:\n    main({call})\nexcept SystemExit:\n    pass\n"
        "print(' '.join(m for m in ('torch', 'mpi4py', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    return set(proc.stdout.split("\n")[-2].split())


# -- help and version -------------------------------------------------------------------------------


def test_help_lists_commands_and_exits_0(tmp_path: Path) -> None:
    proc = ghmpi_cmd(["--help"], tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "usage: ghmpi" in proc.stdout and "run" in proc.stdout
    proc = ghmpi_cmd(["run", "--help"], tmp_path)
    assert proc.returncode == 0
    for text in ("-c CONFIG.yaml", "--set KEY=VALUE", "generation: max_new_tokens", "topology: slices"):
        assert text in proc.stdout


def test_version(tmp_path: Path) -> None:
    proc = ghmpi_cmd(["--version"], tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"ghmpi {ghmpi.__version__}")


@pytest.mark.parametrize("call", [
    "['--help']", "['run', '--help']", "['-c', 'missing.yaml']", "['--print-config']"])
def test_help_errors_and_print_config_import_neither_mpi_nor_torch(tmp_path: Path, call: str) -> None:
    assert imported_after(call, tmp_path) == set()


# -- config errors: one line, exit 2, every rank ----------------------------------------------------

BAD_FILES = {
    "missing": (None, "config file missing.yaml not found"),
    "not_yaml": ("model:\n  dtype: [float32\n", "is not valid YAML: line 3"),
    "not_mapping": ("- 1\n- 2\n", "must be a mapping of sections"),
    "unknown_key": ("generation:\n  max_tokens: 3\n",
                    "unknown key 'generation.max_tokens' in job.yaml (did you mean 'max_new_tokens'?)"),
    "wrong_type": ("generation:\n  top_k: abc\n", "generation.top_k must be an integer, got 'abc'"),
    "bool_for_int": ("topology:\n  slices: yes\n", "topology.slices must be an integer, got True"),
    "out_of_range": ("generation:\n  top_p: 1.5\n", "generation.top_p must be in (0, 1], got 1.5"),
    "bad_choice": ("model:\n  dtype: fp8\n", "model.dtype must be one of float32, bfloat16, float16"),
    "duplicate": ("io:\n  output: a.h5\n  output: b.h5\n", "duplicate key 'io.output'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_is_one_line_exit_2(tmp_path: Path, case: str) -> None:
    text, expected = BAD_FILES[case]
    name = "missing.yaml" if text is None else "job.yaml"
    if text is not None:
        (tmp_path / name).write_text(text)
    message = assert_one_error_line(ghmpi_cmd(["-c", name], tmp_path), expected)
    # the same message as load_config raises: one code path for the library and the CLI
    with pytest.raises(Exception) as info:
        load_config(tmp_path / name)
    assert message == f"ghmpi: error: {info.value}".replace(str(tmp_path / name), name)


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "foo"], "--set expects KEY=VALUE, got 'foo'"),
    (["--set", "generation.max_tokens=3"], "(did you mean 'max_new_tokens'?)"),
    (["run", "--set", "generation.top_k=-1"],
     "generation.top_k must be >= 0, got -1 (from --set generation.top_k=-1)"),
    (["--set", "generation.stop_token_ids=[1,2"], "is not valid YAML"),
])
def test_bad_set_is_one_line_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    assert_one_error_line(ghmpi_cmd(args, tmp_path), expected)


@pytest.mark.parametrize("variable", RANK_ENV_VARS)
def test_only_rank_0_prints_but_every_rank_exits_2(tmp_path: Path, variable: str) -> None:
    (tmp_path / "job.yaml").write_text("generation:\n  top_k: abc\n")
    proc = ghmpi_cmd(["-c", "job.yaml"], tmp_path, env={variable: "3"})
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", "")


def test_rank_0_prints_and_usage_errors_are_quiet_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("generation:\n  top_k: abc\n")
    assert_one_error_line(ghmpi_cmd(["-c", "job.yaml"], tmp_path, env={"PMI_RANK": "0"}),
                          "generation.top_k")
    proc = ghmpi_cmd(["--bogus"], tmp_path, env={"OMPI_COMM_WORLD_RANK": "1"})
    assert (proc.returncode, proc.stderr) == (2, "")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (["--bogus"], ["frob"], ["run", "--set"]):
        proc = ghmpi_cmd(args, tmp_path)
        assert proc.returncode == 2, args
        assert "usage: ghmpi" in proc.stderr and "Traceback" not in proc.stderr


def test_main_in_process_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in RANK_ENV_VARS:
        monkeypatch.delenv(variable, raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("faults:\n  rank: -5\n")
    assert main(["-c", str(bad)]) == 2
    assert capsys.readouterr().err == f"ghmpi: error: faults.rank must be >= -1, got -5 (in {bad})\n"


def test_world_rank_from_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in RANK_ENV_VARS:
        monkeypatch.delenv(variable, raising=False)
    assert world_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert world_rank() == 5
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")  # the first present wins
    assert world_rank() == 2


# -- resolving and printing the config ------------------------------------------------------------


def test_no_config_uses_the_checkouts_default_job(tmp_path: Path) -> None:
    assert default_config_path() == REPO / "jobs" / "default.yaml"
    proc = ghmpi_cmd(["--print-config"], tmp_path)  # a cwd without jobs/
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == config_to_dict(Config())


def test_print_config_applies_overrides_and_round_trips(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("generation:\n  max_new_tokens: 8\n")
    proc = ghmpi_cmd(["run", "-c", "job.yaml", "--set", "generation.stop_token_ids=[2,3]",
                      "--set", "model.dtype=float32", "--print-config"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "resolved.yaml").write_text(proc.stdout)
    cfg = load_config(tmp_path / "resolved.yaml")
    assert cfg.generation.max_new_tokens == 8 and cfg.generation.stop_token_ids == (2, 3)
    assert cfg.model.dtype == "float32"
    proc = ghmpi_cmd(["-c", "job.yaml", "--print-config"], tmp_path, env={"PMIX_RANK": "1"})
    assert (proc.returncode, proc.stdout) == (0, "")  # other ranks stay quiet


def test_default_job_falls_back_to_the_current_directory(tmp_path: Path) -> None:
    # ghmpi installed outside a checkout: jobs/default.yaml is looked up in the cwd.
    site = tmp_path / "site"
    shutil.copytree(REPO / "ghmpi", site / "ghmpi", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    (work / "jobs").mkdir(parents=True)
    (work / "jobs" / "default.yaml").write_text("generation:\n  max_new_tokens: 7\n")
    proc = ghmpi_cmd(["--print-config"], work, pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["generation"]["max_new_tokens"] == 7
    assert_one_error_line(ghmpi_cmd([], tmp_path, pythonpath=site),
                          "config file jobs/default.yaml not found")


# -- prepare / export errors ------------------------------------------------------------------------


def io_text_importable() -> bool:
    try:
        importlib.import_module("ghmpi.io.text")
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("ghmpi.io"):
            return False
        raise
    return True


@pytest.mark.skipif(not io_text_importable(), reason="ghmpi.io.text (prepare/export) not written yet")
def test_prepare_input_error_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = ghmpi_cmd(["prepare", "missing.txt", "-m", "no-model", "-o", "p.h5"], tmp_path)
    assert_one_error_line(proc)
    assert "prepare" in ghmpi_cmd(["--help"], tmp_path).stdout
