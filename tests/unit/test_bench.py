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


def test_pipeline_suite(tmp_path: Path) -> None:
    """The ring at -n 3 with a reply delay, the single tier and a hybrid layout, against both
    tiers' capacities measured in the same run; each ring job traced, its decode phase's rate
    set against the same bound."""
    r = bench("pipeline", "--workdir", str(tmp_path / "w"), "--delays", "0,2", "--single",
              "--hybrid", "1", tmp_path=tmp_path)
    assert r["ranks"] == 3 and [j["delay_ms"] for j in r["jobs"]] == [0, 2]
    assert r["tier1_capacity_tps"] > 0 and r["tier2_capacity_tps"] > 0
    assert r["bound_tps"] == min(r["tier1_capacity_tps"], r["tier2_capacity_tps"])
    assert sum(r["tier2_slots"]) == r["micro_batches"] * r["micro_batch_size"]
    assert all(j["tokens_per_s"] > 0 and 0 <= j["tier2_busy"] <= 1 for j in r["jobs"])
    assert r["jobs"][0]["of_zero_delay"] == 1
    for j in r["jobs"]:  # traced: the decode phase's rate, and each phase's length
        assert j["decode_s"] > 0 and j["decode_phase_tps"] > 0 and j["prefill_s"] >= 0
        assert j["decode_of_bound"] == j["decode_phase_tps"] / r["bound_tps"]
    assert r["single_tier_tps"] > 0 and r["hybrid_tps"] > 0 and "hybrid_target_tps" in r
    # the jobs' single-copy setting labels the figures (Open MPI 4's variable, else "default")
    assert r["single_copy"] == (os.environ.get("OMPI_MCA_btl_vader_single_copy_mechanism", "")
                                .strip() or "default")


def test_unknown_suite_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ghmpi", "bench", "nope"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_tier2_capacity_leaves_out_ranks_dealt_no_slot() -> None:
    """A hybrid whose GPU holds nearly every prompt deals some tier-2 ranks no slot: they idle in
    the job, and the capacity is the others'."""
    from ghmpi.bench.pipeline import tier2_capacity

    tps, gbps = tier2_capacity("tiny", None, "bfloat16", [1, 1], [2, 0], 20)
    assert tps > 0 and gbps > 0


def test_job_tier2_split_follows_the_tier2_sets() -> None:
    """`bench pipeline`'s capacities lay the slots out as the job does: 7 sets of 2 threads on
    16 cores (14 micro-batches of 19) deal the two 1-thread ranks one micro-batch each."""
    from ghmpi.bench.pipeline import _layout, job_tier2_split

    line = "ghmpi: 9 ranks: 1 tier-1 (cuda:0), 8 tier-2; 14 micro-batches x 19 slots, 7 tier-2 sets"
    mbs, size, sets = _layout([line + "; 256 prompts, 0 already done"])
    assert (mbs, size, sets) == (14, 19, 7)
    threads, slots = job_tier2_split(9, True, 16, mbs, size, 32, sets)
    assert threads == [2] * 6 + [1] * 2 and slots == [38] * 6 + [19, 19]
    assert _layout(["2 micro-batches x 128 slots, a prefill lane; 256 prompts"]) == (2, 128, 1)


def test_job_ranks_run_the_code_on_the_given_pythonpath(tmp_path: Path, monkeypatch) -> None:
    """An A/B hands run_ghmpi another version's code on PYTHONPATH: its ranks must run that one,
    even when the caller's working directory is a checkout of this one (`python -m` puts the
    working directory first on sys.path)."""
    from ghmpi.bench.job import run_ghmpi

    other = tmp_path / "other" / "ghmpi"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    (other / "__main__.py").write_text(  # writes the output run_ghmpi reads, says who it is
        "import sys, h5py\n"
        "out = [a.split('=', 1)[1] for a in sys.argv if a.startswith('io.output=')][0]\n"
        "with h5py.File(out, 'w') as f:\n"
        "    f.attrs['generated_tokens'] = 7\n"
        "print('ghmpi: tier 2: the other version', flush=True)\n")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the checkout's root
    job = run_ghmpi(tmp_path / "model", tmp_path / "prompts.h5", tmp_path / "out.h5", 1, 1,
                    "float32", [], env={"PYTHONPATH": str(other.parent)})
    assert job["summary"] == ["ghmpi: tier 2: the other version"]
    assert job["generated_tokens"] == 7
