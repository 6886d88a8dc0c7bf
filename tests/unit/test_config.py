"""ghmpi.config: YAML job files -> frozen dataclasses, every error a one-sentence ConfigError."""

import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest
import yaml

from ghmpi.config import (
    SECTIONS,
    Config,
    GenerationConfig,
    TopologyConfig,
    config_reference_markdown,
    config_to_dict,
    config_to_yaml,
    load_config,
)
from ghmpi.errors import ConfigError, GhmpiError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path | None, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- defaults and shipped job files -----------------------------------------------------------------


def test_defaults_match_the_brief() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.path == "data/tiny-llama" and cfg.model.dtype == "bfloat16"
    assert cfg.io.prompts == "data/prompts.h5" and cfg.io.output == "out/completions.h5"
    assert cfg.io.overwrite is False and cfg.io.flush_every == 256 and cfg.io.flush_seconds == 5.0
    g = cfg.generation
    assert (g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.seed) == (64, 0.0, 0, 1.0, 0)
    assert g.stop_token_ids == () and g.ignore_eos is False
    t = cfg.topology
    assert (t.slices, t.micro_batches, t.micro_batch_size, t.hybrid_slots) == (1, 0, 0, 0)
    assert (t.device, t.kv_dtype, t.kv_memory_gb, t.prefill_tokens) == ("auto", "auto", 0.0, 4096)
    assert (cfg.runtime.torch_threads, cfg.runtime.progress_seconds) == (0, 10.0)
    assert (cfg.faults.rank, cfg.faults.after_steps) == (-1, 0)
    assert cfg.kv_dtype == "bfloat16"  # auto resolves to model.dtype


def test_default_job_file_is_the_default_config_and_lists_every_key() -> None:
    path = REPO / "jobs" / "default.yaml"
    assert load_config(path) == Config()
    raw = yaml.safe_load(path.read_text())
    assert {s: set(body) for s, body in raw.items()} == {
        s: {f.name for f in dataclasses.fields(cls)} for s, cls in SECTIONS.items()}
    # every key carries a comment
    for line in path.read_text().splitlines():
        if re.match(r"^\s+\w+:", line):
            assert "#" in line, line


def test_example_cluster_job_loads() -> None:
    cfg = load_config(REPO / "jobs" / "example-cluster.yaml")
    assert cfg.model.dtype == "bfloat16" and cfg.topology.slices == 1
    assert cfg.topology.micro_batches > 0 and cfg.topology.micro_batch_size > 0


def test_missing_sections_and_keys_take_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "generation:\n  top_k: 40\nfaults:\n")
    cfg = load_config(path)
    assert cfg.generation.top_k == 40
    assert dataclasses.replace(cfg, generation=GenerationConfig()) == Config()
    assert load_config(write(tmp_path, "# nothing but a comment\n", "empty.yaml")) == Config()


def test_values_are_normalised(tmp_path: Path) -> None:
    path = write(tmp_path, "generation:\n  temperature: 1\n  stop_token_ids: [2, 3]\n"
                           "topology:\n  kv_memory_gb: 2\n  kv_dtype: float16\n")
    cfg = load_config(path)
    assert cfg.generation.temperature == 1.0 and isinstance(cfg.generation.temperature, float)
    assert isinstance(cfg.topology.kv_memory_gb, float)
    assert cfg.generation.stop_token_ids == (2, 3)  # a tuple: the config is immutable
    assert cfg.kv_dtype == "float16"


def test_exponent_floats_are_numbers(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; a user means a number.
    cfg = load_config(write(tmp_path, "topology:\n  kv_memory_gb: 1e-3\n"), ["io.flush_seconds=2E1"])
    assert cfg.topology.kv_memory_gb == 0.001 and cfg.io.flush_seconds == 20.0
    assert "must be an integer, got '1e3'" in error_of(None, ("generation.top_k=1e3",))


def test_config_is_frozen_hashable_and_picklable() -> None:
    cfg = load_config(None, ["generation.stop_token_ids=[7]"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.generation.top_k = 3  # type: ignore[misc]
    assert hash(cfg) == hash(load_config(None, ["generation.stop_token_ids=[7]"]))
    assert pickle.loads(pickle.dumps(cfg)) == cfg


# -- errors in the file -----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "jobs" / "x.yaml"
    assert error_of(missing) == f"config file {missing} not found"
    assert "is a directory" in error_of(tmp_path)


def test_not_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  path: a\n  dtype: [float32\n")
    message = error_of(path)
    assert message.startswith(f"config file {path} is not valid YAML: line ")
    assert isinstance(ConfigError(message), GhmpiError)
    assert "line 3, column 2" in error_of(write(tmp_path, "model:\n  path: a\n dtype: x\n  y: 1\n", "b.yaml"))


def test_top_level_and_section_must_be_mappings(tmp_path: Path) -> None:
    assert "must be a mapping of sections" in error_of(write(tmp_path, "- model\n- io\n"))
    message = error_of(write(tmp_path, "model: data/tiny-llama\n", "s.yaml"))
    assert message.startswith("section 'model' in ") and "must be a mapping of keys" in message


def test_unknown_key_and_section_suggest_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "generation:\n  max_tokens: 3\n")
    assert error_of(path) == f"unknown key 'generation.max_tokens' in {path} (did you mean 'max_new_tokens'?)"
    path = write(tmp_path, "generaton:\n  top_k: 3\n", "s.yaml")
    assert error_of(path) == f"unknown section 'generaton' in {path} (did you mean 'generation'?)"
    path = write(tmp_path, "top_k: 3\n", "t.yaml")
    assert "(did you mean 'generation.top_k'?)" in error_of(path)
    path = write(tmp_path, "model:\n  zzz: 3\n", "u.yaml")
    assert "(keys of 'model' are: path, dtype)" in error_of(path)


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "generation:\n  top_k: 1\n  top_k: 2\n")
    assert error_of(path) == f"duplicate key 'generation.top_k' in config file {path}, line 3"


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("generation:\n  top_k: abc\n", "generation.top_k must be an integer, got 'abc'"),
    ("generation:\n  top_k: true\n", "generation.top_k must be an integer, got True"),  # bool is no int
    ("generation:\n  max_new_tokens: 2.0\n", "generation.max_new_tokens must be an integer, got 2.0"),
    ("generation:\n  max_new_tokens: 0\n", "generation.max_new_tokens must be >= 1, got 0"),
    ("generation:\n  top_p: 1.5\n", "generation.top_p must be in (0, 1], got 1.5"),
    ("generation:\n  top_p: 0\n", "generation.top_p must be in (0, 1], got 0"),
    ("generation:\n  temperature: -0.5\n", "generation.temperature must be >= 0, got -0.5"),
    ("generation:\n  temperature: hot\n", "generation.temperature must be a number, got 'hot'"),
    ("generation:\n  ignore_eos: 1\n", "generation.ignore_eos must be true or false, got 1"),
    ("generation:\n  stop_token_ids: 2\n", "generation.stop_token_ids must be a list of integers, got 2"),
    ("generation:\n  stop_token_ids: [2, x]\n",
     "generation.stop_token_ids must be a list of integers, got 'x' in it"),
    ("generation:\n  stop_token_ids: [-1]\n", "generation.stop_token_ids entries must be >= 0, got -1"),
    ("model:\n  dtype: fp8\n", "model.dtype must be one of float32, bfloat16, float16, got 'fp8'"),
    ("model:\n  path: ''\n", "model.path must be a non-empty string, got ''"),
    ("io:\n  flush_seconds: 0\n", "io.flush_seconds must be > 0, got 0"),
    ("io:\n  flush_every: 0\n", "io.flush_every must be >= 1, got 0"),
    ("topology:\n  device: gpu\n", "topology.device must be one of auto, cpu, cuda, got 'gpu'"),
    ("topology:\n  kv_dtype: int8\n",
     "topology.kv_dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
    ("topology:\n  kv_memory_gb: .inf\n", "topology.kv_memory_gb must be a finite number, got inf"),
    ("topology:\n  slices: 0\n", "topology.slices must be >= 1, got 0"),
    ("topology:\n  micro_batch_size: 4\n  hybrid_slots: 5\n",
     "topology.hybrid_slots must be <= topology.micro_batch_size (4), got 5"),
    ("runtime:\n  torch_threads: -1\n", "runtime.torch_threads must be >= 0, got -1"),
    ("faults:\n  rank: -2\n", "faults.rank must be >= -1, got -2"),
])
def test_bad_values_name_key_value_and_file(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = write(tmp_path, yaml_text)
    assert error_of(path) == f"{expected} (in {path})"


def test_sections_validate_when_built_directly() -> None:
    with pytest.raises(ConfigError, match=r"^generation.top_k must be >= 0, got -1$"):
        GenerationConfig(top_k=-1)
    assert TopologyConfig(micro_batch_size=0, hybrid_slots=3).hybrid_slots == 3  # 0 = auto: no bound
    with pytest.raises(ConfigError, match="Config.model must be a ModelConfig"):
        Config(model={"path": "x"})  # type: ignore[arg-type]


# -- --set overrides ------------------------------------------------------------------------------


def test_overrides_apply_on_top_of_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "generation:\n  top_k: 5\n  seed: 9\n")
    cfg = load_config(path, [
        "generation.stop_token_ids=[2,3]", "model.dtype=float32", "generation.top_k=40",
        "generation.top_k=50", "io.output = out/x.h5", "generation.temperature=0.7",
        "generation.ignore_eos=true"])
    assert cfg.generation.stop_token_ids == (2, 3) and cfg.model.dtype == "float32"
    assert cfg.generation.top_k == 50  # the last --set wins
    assert cfg.generation.seed == 9  # the file's value stays
    assert cfg.io.output == "out/x.h5" and cfg.generation.temperature == 0.7
    assert cfg.generation.ignore_eos is True


def test_override_of_a_path_keeps_the_text() -> None:
    cfg = load_config(None, ["io.output=2024", "model.path=on", "io.prompts=a=b.h5"])
    assert (cfg.io.output, cfg.model.path, cfg.io.prompts) == ("2024", "on", "a=b.h5")


@pytest.mark.parametrize(("override", "expected"), [
    ("foo", "--set expects KEY=VALUE, got 'foo'"),
    ("=3", "--set expects KEY=VALUE, got '=3'"),
    ("generation.max_tokens=3",
     "unknown key 'generation.max_tokens' in --set generation.max_tokens=3 (did you mean 'max_new_tokens'?)"),
    ("top_k=3", "unknown key 'top_k' in --set top_k=3 (did you mean 'generation.top_k'?)"),
    ("modle.dtype=float32",
     "unknown section 'modle' in --set modle.dtype=float32 (did you mean 'model'?)"),
    ("generation.top_p=1.5",
     "generation.top_p must be in (0, 1], got 1.5 (from --set generation.top_p=1.5)"),
    ("generation.top_k=abc",
     "generation.top_k must be an integer, got 'abc' (from --set generation.top_k=abc)"),
    ("generation.top_k=",
     "generation.top_k must be an integer, got None (from --set generation.top_k=)"),
])
def test_bad_overrides(override: str, expected: str) -> None:
    assert error_of(None, (override,)) == expected


def test_override_value_that_is_not_yaml() -> None:
    message = error_of(None, ("generation.stop_token_ids=[1,2",))
    assert message.startswith("the value of --set generation.stop_token_ids=[1,2 is not valid YAML: line 1")


def test_error_names_the_set_that_caused_it_not_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "topology:\n  micro_batch_size: 4\n")
    assert error_of(path, ("topology.hybrid_slots=9",)).endswith("(from --set topology.hybrid_slots=9)")


# -- writing --------------------------------------------------------------------------------------


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, [
        "model.path=/models/x y", "model.dtype=float16", "io.overwrite=true", "io.flush_seconds=0.25",
        "generation.stop_token_ids=[128001, 128009]", "generation.temperature=0.8",
        "generation.top_p=0.9", "generation.top_k=50", "topology.slices=2",
        "topology.micro_batch_size=8", "topology.hybrid_slots=2", "topology.kv_dtype=float32",
        "topology.kv_memory_gb=1.5e-3", "faults.rank=3", "faults.after_steps=100"])
    text = config_to_yaml(cfg)
    assert "stop_token_ids: [128001, 128009]" in text
    assert load_config(write(tmp_path, text)) == cfg
    assert load_config(write(tmp_path, config_to_yaml(Config()), "d.yaml")) == Config()


def test_config_to_dict_is_plain_data() -> None:
    d = config_to_dict(load_config(None, ["generation.stop_token_ids=[5]"]))
    assert list(d) == list(SECTIONS)
    assert d["generation"]["stop_token_ids"] == [5]
    assert json.loads(json.dumps(d)) == d
    assert Config(**{s: SECTIONS[s](**body) for s, body in d.items()}) == load_config(
        None, ["generation.stop_token_ids=[5]"])


def test_reference_lists_every_key_with_default_and_doc() -> None:
    text = config_reference_markdown()
    assert text.startswith("| key | default | meaning |\n|---|---|---|\n")
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata["doc"], f"{section}.{f.name} has no doc"
            row = next(line for line in text.splitlines() if line.startswith(f"| `{section}.{f.name}` |"))
            assert row.count(" | ") == 2, row  # '|' inside docs is escaped
    assert "| `generation.stop_token_ids` | `[]` |" in text
    assert "| `io.overwrite` | `false` |" in text
    assert "| `model.path` | `data/tiny-llama` |" in text


def test_readme_reference_is_current() -> None:
    readme = REPO / "README.md"
    begin, end = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
    text = readme.read_text() if readme.is_file() else ""
    if begin not in text or end not in text:
        pytest.skip("README.md has no config-reference markers yet")
    current = text.split(begin, 1)[1].split(end, 1)[0]
    assert current.strip() == config_reference_markdown().strip(), (
        "README config reference is stale: paste the output of `python -m ghmpi.config` "
        f"between {begin} and {end}")
