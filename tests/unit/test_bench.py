"""The bench suites run on a CPU at tiny sizes: their plumbing and their ratios, never speed."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def bench(*args: str, tmp_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PMIX_MCA_psec="native")
    proc = subprocess.run([sys.executable, "-m", "ghmpi", "bench", *args, "--json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_decode_suite(tmp_path: Path) -> None:
    r = bench("decode", "--repeat", "2", tmp_path=tmp_path)
    assert r["suite"] == "decode" and r["copy_GBps"] > 0
    assert [s["batch"] for s in r["steps"]] == [1, 4, 16]
    for s in r["steps"]:
        assert s["step_ms"] > 0 and 0 < s["of_roofline"] < 1.5
        assert s["bytes_GB"] > 0


def test_prefill_suite(tmp_path: Path) -> None:
    r = bench("prefill", "--repeat", "2", tmp_path=tmp_path)
    assert r["gemm_peak_tflops"] > 0
    assert [p["pass_tokens"] for p in r["passes"]] == [64, 128]
    assert all(0 < p["of_gemm_peak"] < 1.5 for p in r["passes"])


def test_job_suite_against_transformers(tmp_path: Path) -> None:
    r = bench("job", "--workdir", str(tmp_path / "w"), tmp_path=tmp_path)
    assert r["ghmpi"]["generated_tokens"] == r["transformers"]["tokens"] == 8 * 8
    assert r["ghmpi_over_transformers"] > 0


def test_unknown_suite_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ghmpi", "bench", "nope"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
