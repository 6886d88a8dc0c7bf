"""Bad input is caught before any work: one `ghmpi: error:` line naming what and where, exit 2,
every rank exits (no hang), and an existing output file is left exactly as it was."""

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest

from e2e_jobs import MODEL, ghmpi, write_job
from ghmpi.io.prompts import write_prompts


def _other_jobs_output(path):
    with h5py.File(path, "w") as f:
        f["tokens"] = np.array([5, 6, 7], dtype=np.int32)
        f["offsets"] = np.array([0, 3], dtype=np.int64)
        f["finish_reason"] = np.array([2], dtype=np.uint8)
        f.attrs["job_id"] = "another-job"


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _case(tmp, name, prompts_file):
    """Make the broken input of one case; return (extra --set args, expected fragment)."""
    if name == "config-missing":
        return ["-c", str(tmp / "nope.yaml")], "nope.yaml"
    if name == "config-not-yaml":
        (tmp / "bad.yaml").write_text("model: [unclosed\n")
        return ["-c", str(tmp / "bad.yaml")], "bad.yaml"
    if name == "unknown-key":
        return ["--set", "generation.max_tokens=3"], "generation.max_tokens"
    if name == "bad-value":
        return ["--set", "generation.top_p=1.5"], "generation.top_p"
    if name == "prompts-missing":
        return ["--set", f"io.prompts={tmp / 'none.h5'}"], "none.h5"
    if name == "prompts-not-hdf5":
        (tmp / "p.h5").write_text("hello")
        return ["--set", f"io.prompts={tmp / 'p.h5'}"], "not a readable HDF5"
    if name == "prompts-wrong-layout":
        with h5py.File(tmp / "p.h5", "w") as f:
            f["foo"] = np.arange(3)
        return ["--set", f"io.prompts={tmp / 'p.h5'}"], "p.h5"
    if name == "token-id-out-of-vocab":
        write_prompts(tmp / "p.h5", [[2, 3], [4, 5, 6], [7], [8, 5000, 9]])
        return ["--set", f"io.prompts={tmp / 'p.h5'}"], "prompt 3"
    if name == "model-missing":
        return ["--set", f"model.path={tmp / 'no-model'}"], "no-model"
    if name == "model-unsupported":
        shutil.copytree(MODEL, tmp / "m")
        cfg = json.loads((tmp / "m" / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (tmp / "m" / "config.json").write_text(json.dumps(cfg))
        return ["--set", f"model.path={tmp / 'm'}"], "gpt2"
    if name == "weights-truncated":
        shutil.copytree(MODEL, tmp / "m")
        w = tmp / "m" / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        return ["--set", f"model.path={tmp / 'm'}"], "model.safetensors"
    if name == "slices-over-world":
        return ["--set", "topology.slices=3"], "topology.slices"
    if name == "stop-id-out-of-vocab":
        return ["--set", "generation.stop_token_ids=[99999]"], "stop_token_ids"
    if name == "output-unusable":
        (tmp / "afile").write_text("x")
        return ["--set", f"io.output={tmp / 'afile' / 'c.h5'}"], "afile"
    if name == "output-of-another-job":
        return [], "another job"
    raise AssertionError(name)


CASES = ["config-missing", "config-not-yaml", "unknown-key", "bad-value", "prompts-missing",
         "prompts-not-hdf5", "prompts-wrong-layout", "token-id-out-of-vocab", "model-missing",
         "model-unsupported", "weights-truncated", "slices-over-world", "stop-id-out-of-vocab",
         "output-unusable", "output-of-another-job"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_exits_2_with_one_line_and_keeps_the_output(tmp_path, prompts_file, name):
    out = tmp_path / "out" / "completions.h5"
    out.parent.mkdir()
    _other_jobs_output(out)
    before = _digest(out)
    job = write_job(tmp_path / "job.yaml", prompts_file, out)
    extra, fragment = _case(tmp_path, name, prompts_file)
    args = extra if extra[:1] == ["-c"] else ["-c", str(job), *extra]
    r = ghmpi(2, *args, timeout=120)
    ours = [l for l in r.stderr.splitlines() if l.startswith("ghmpi:")]
    assert r.returncode == 2, r.stderr
    assert len(ours) == 1 and ours[0].startswith("ghmpi: error: "), r.stderr
    assert fragment in ours[0], ours[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert _digest(out) == before
    assert not (tmp_path / "out" / "completions.h5.parts").exists()
