"""`python -m ghmpi bench attention --tiny --json` through the CLI: the keys and ratios are sane.
Never asserts a speed (CI's cores are shared)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench(args: list[str], tmp_path: Path, **env) -> dict:
    out = tmp_path / "attention.json"
    e = {**os.environ, "PYTHONPATH": str(REPO), **env}
    r = subprocess.run([sys.executable, "-m", "ghmpi", "bench", "attention", "--tiny", "--json",
                        "-o", str(out), *args], cwd=tmp_path, env=e, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert json.loads(out.read_text()) == result
    return result


def _check_ratios(row: dict, paths: list[str], dram: float) -> None:
    for path in paths:
        gbps, ratio = row[f"{path}_kv_read_GBps"], row[f"{path}_ratio"]
        assert gbps > 0 and math.isfinite(gbps)
        assert math.isclose(ratio, gbps / dram, rel_tol=1e-9)
    assert row["kv_read_GBps"] == row[f"{paths[0]}_kv_read_GBps"] and row["ratio"] == row[f"{paths[0]}_ratio"]


def test_bench_attention_tiny_json(tmp_path):
    res = _bench([], tmp_path)
    assert res["suite"] == "attention" and res["dram_read_GBps"] > 0
    paths = ["native", "torch"] if "native kernel" in res["kernel"] else ["torch"]
    assert {f"{p}_ratio_median" for p in paths} <= res.keys()
    rows = res["rows"]
    assert {r["heads"] for r in rows} == {"32/8", "32/32"}
    assert {r["dtype"] for r in rows} == {"bfloat16", "float16"}
    assert any(r["context"].startswith("mixed") for r in rows)
    for r in rows:
        _check_ratios(r, paths, res["dram_read_GBps"])
        assert r["kv_MB"] > 0
    assert res["splits"] and {s["ranks"] * s["threads"] for s in res["splits"]} == {res["cores"]}
    for s in res["splits"]:
        _check_ratios(s, paths, res["dram_read_GBps"])


def test_bench_attention_torch_only(tmp_path):
    res = _bench(["--heads", "gqa", "--splits", "none", "--dtypes", "bfloat16"], tmp_path,
                 GHMPI_CPU_KERNEL="torch")
    assert "torch fallback" in res["kernel"] and res["splits"] == []
    for r in res["rows"]:
        assert "native_kv_read_GBps" not in r
        _check_ratios(r, ["torch"], res["dram_read_GBps"])


def test_llc_bytes_reads_the_largest_cache_past_entries_that_are_not_caches(tmp_path):
    """`llc_bytes` takes the largest of a sysfs cache folder's `index*/size`, past entries that
    are not caches (`uevent`, which a directory listing may give first: it once made the bench
    take a 480 MB L3 for the 32 MiB default), and falls back to 32 MiB where there is none."""
    from ghmpi.bench.attention import llc_bytes

    (tmp_path / "uevent").write_text("")
    (tmp_path / "power").mkdir()
    for entry, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "491520K")):
        (tmp_path / entry).mkdir()
        (tmp_path / entry / "size").write_text(size + "\n")
    assert llc_bytes(str(tmp_path)) == 491520 << 10
    assert llc_bytes(str(tmp_path / "missing")) == 32 << 20
