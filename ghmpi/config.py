"""Job configuration: YAML -> frozen dataclasses, validated on construction.

A job file has six sections (`model`, `io`, `generation`, `topology`, `runtime`, `faults`); every
key is optional and takes the default below. Each field carries its documentation in
``field(metadata={"doc": ...})`` and its check in ``metadata["check"]``, so the README's reference
table (`config_reference_markdown`, or ``python -m ghmpi.config``) is generated and cannot drift.

Every rank of an MPI job loads the same file itself: loading is deterministic and imports neither
MPI nor torch, so a bad file is reported before any communicator exists and every rank exits.
"""

import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Sequence

import yaml

from ghmpi.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


class ConfigValueError(ConfigError):
    """A value failed its check; `key` is the dotted key, so the loader can say where it came from."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------------------------------
# Checks: each takes (dotted key, raw value) and returns the normalised value or raises.

Check = Callable[[str, Any], Any]


def _num(v: float) -> str:
    return repr(int(v)) if isinstance(v, float) and v.is_integer() else repr(v)


def _integer(lo: int | None = None) -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigValueError(key, f"{key} must be an integer, got {value!r}")
        if lo is not None and value < lo:
            raise ConfigValueError(key, f"{key} must be >= {lo}, got {value!r}")
        return value

    return check


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number(lo: float | None = None, lo_open: bool = False, hi: float | None = None) -> Check:
    """Float in [lo, ...) or (lo, ...), optionally with an inclusive upper bound hi."""

    def check(key: str, value: Any) -> float:
        given = value
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigValueError(key, f"{key} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigValueError(key, f"{key} must be a finite number, got {given!r}")
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and value > hi
        if too_low or too_high:
            if hi is not None:
                rng = f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}]"
            else:
                rng = f"{'>' if lo_open else '>='} {_num(lo)}"
            raise ConfigValueError(key, f"{key} must be {rng}, got {given!r}")
        return value

    return check


def _boolean() -> Check:
    def check(key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ConfigValueError(key, f"{key} must be true or false, got {value!r}")
        return value

    return check


def _string() -> Check:
    def check(key: str, value: Any) -> str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            raise ConfigValueError(key, f"{key} must be a non-empty string, got {value!r}")
        return value

    return check


def _choice(*options: str) -> Check:
    def check(key: str, value: Any) -> str:
        if value not in options:
            raise ConfigValueError(key, f"{key} must be one of {', '.join(options)}, got {value!r}")
        return value

    return check


def _integer_list(lo: int) -> Check:
    def check(key: str, value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)):
            raise ConfigValueError(key, f"{key} must be a list of integers, got {value!r}")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ConfigValueError(key, f"{key} must be a list of integers, got {item!r} in it")
            if item < lo:
                raise ConfigValueError(key, f"{key} entries must be >= {lo}, got {item!r}")
        return tuple(value)

    return check


def _string_list() -> Check:
    def check(key: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigValueError(key, f"{key} must be a list of strings, got {value!r}")
        for item in value:
            if not isinstance(item, str) or not item:
                raise ConfigValueError(key, f"{key} must be a list of non-empty strings, got "
                                            f"{item!r} in it")
        return tuple(value)

    return check


def _opt(default: Any, check: Check, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check})


def _validate(section: Any) -> None:
    """Run every field's check, storing the normalised value (int -> float, list -> tuple)."""
    for f in fields(section):
        key = f"{section.SECTION}.{f.name}"
        value = f.metadata["check"](key, getattr(section, f.name))
        object.__setattr__(section, f.name, value)


# --------------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The checkpoint and tier 1's compute precision."""

    SECTION: ClassVar[str] = "model"
    path: str = _opt(
        "data/tiny-llama", _string(),
        "Hugging Face model folder: config.json + *.safetensors (+ tokenizer.json)")
    dtype: str = _opt(
        "bfloat16", _choice(*DTYPES),
        "tier-1 compute dtype: float32 | bfloat16 | float16")

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, slots=True)
class IOConfig:
    """Where prompts come from and completions go, and how often finished work is persisted."""

    SECTION: ClassVar[str] = "io"
    prompts: str = _opt(
        "data/prompts.h5", _string(),
        "prompts HDF5 file (`python -m ghmpi prepare` writes one)")
    output: str = _opt(
        "out/completions.h5", _string(),
        "completions HDF5 file, written when every prompt is done")
    overwrite: bool = _opt(
        False, _boolean(),
        "true: discard the parts/output of another job and start afresh; "
        "false: resume this job, refuse another job's files")
    flush_every: int = _opt(
        256, _integer(lo=1),
        "completions per persisted shard (>= 1)")
    flush_seconds: float = _opt(
        5.0, _number(lo=0, lo_open=True),
        "persist finished completions at least this often (seconds, > 0)")

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, slots=True)
class GenerationConfig:
    """Sampling and stopping."""

    SECTION: ClassVar[str] = "generation"
    max_new_tokens: int = _opt(
        64, _integer(lo=1),
        "tokens to generate per prompt (>= 1); per-prompt values in the prompts file override it")
    temperature: float = _opt(
        0.0, _number(lo=0),
        "sampling temperature (>= 0); 0 = greedy")
    top_k: int = _opt(
        0, _integer(lo=0),
        "sample among the k most likely tokens (>= 0); 0 = off")
    top_p: float = _opt(
        1.0, _number(lo=0, lo_open=True, hi=1),
        "nucleus sampling mass, in (0, 1]; 1 = off")
    seed: int = _opt(
        0, _integer(lo=0),
        "random seed (>= 0); with the prompt's index it fixes that prompt's random stream")
    stop_token_ids: tuple[int, ...] = _opt(
        (), _integer_list(lo=0),
        "token ids (>= 0) that end a sequence, on top of the model's eos_token_id(s)")
    ignore_eos: bool = _opt(
        False, _boolean(),
        "true: do not stop on the model's eos ids (stop_token_ids still stop)")
    n: int = _opt(
        1, _integer(lo=1),
        "samples per prompt (>= 1), sharing one prefill; the prompts file's `n` overrides it per "
        "prompt; completions are stored prompt-major (row r = prompt r // n, sample r % n)")
    logprobs: int = _opt(
        0, _integer(lo=0),
        "k >= 0: store each generated token's log-probability (`logprobs`) and the k most "
        "likely tokens' (`top_logprob_ids`, `top_logprobs`), from the raw logits before "
        "temperature and filtering; 0 = off (unless a prompt asks for them)")
    prompt_logprobs: bool = _opt(
        False, _boolean(),
        "true: store the prompt tokens' log-probabilities (`prompt_logprobs`, NaN for each "
        "prompt's first token), computed in the prefill")
    stop: tuple[str, ...] = _opt(
        (), _string_list(),
        "stop strings: a sequence ends when its decoded text contains one (finish_reason 3); "
        "the prompts file's `stop` overrides it per prompt; needs the model's tokenizer")
    include_stop_str: bool = _opt(
        False, _boolean(),
        "with stop strings, false: the stored ids end before the first token overlapping the "
        "stop string; true: they end with the token completing it (as transformers' generate)")

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, slots=True)
class TopologyConfig:
    """How ranks, micro-batches and KV caches are laid out."""

    SECTION: ClassVar[str] = "topology"
    slices: int = _opt(
        1, _integer(lo=1),
        "tier-1 ranks (pipeline slices, >= 1); world ranks 0..slices-1; every other rank is tier 2")
    micro_batches: int = _opt(
        0, _integer(lo=0),
        "micro-batches in flight per ring (>= 0); 0 = auto: 2 per slice and tier-2 set with tier 2 "
        "(1 without), plus one per slice and set per 5 ms of runtime.reply_delay_ms")
    micro_batch_size: int = _opt(
        0, _integer(lo=0),
        "sequence slots per micro-batch (>= 0); 0 = auto")
    hybrid_slots: int = _opt(
        0, _integer(lo=0),
        "slots of each micro-batch whose KV cache stays on tier 1 (>= 0, <= micro_batch_size)")
    tier2_sets: int = _opt(
        1, _integer(lo=1),
        "disjoint sets the tier-2 ranks of each slice form (>= 1, at most the ranks a slice "
        "has): each tier-2-served micro-batch is served by one set alone, so its layers wait on "
        "that set's ranks only; sets balance the ranks' threads (where they cannot split them "
        "evenly, the log says so and names the counts that do); topology.micro_batches must be a "
        "multiple (auto: 2 per slice and set)")
    prefill_lane_tokens: int = _opt(
        8192, _integer(lo=0),
        "with tier-2 ranks: prompt tokens per pass of the prefill lane (>= 0), which prefills "
        "the tier-2-served micro-batches' prompts in passes of their own (a longer prompt in "
        "chunks of it), run on tier 1 when no micro-batch's layer is ready, so a micro-batch's "
        "decoding never waits on a prefill; a sequence joins its micro-batch once its first "
        "token is sampled; 0 = no lane: prompts are prefilled in the micro-batches' own passes "
        "(prefill_tokens)")
    gpu_micro_batches: int = _opt(
        0, _integer(lo=0),
        "hybrid: micro-batches whose KV cache stays wholly on the GPU, run beside the "
        "tier-2-served ones and never waiting on them (>= 0; needs tier-2 ranks)")
    gpu_micro_batch_size: int = _opt(
        0, _integer(lo=0),
        "slots per GPU micro-batch (>= 0); 0 = auto: the GPU's KV budget")
    device: str = _opt(
        "auto", _choice("auto", "cpu", "cuda"),
        "tier-1 device: auto | cpu | cuda; auto = cuda if a GPU is visible")
    kv_dtype: str = _opt(
        "auto", _choice("auto", *DTYPES),
        "KV-cache dtype: auto | float32 | bfloat16 | float16; auto = model.dtype")
    kv_memory_gb: float = _opt(
        0.0, _number(lo=0),
        "KV-cache budget per rank holding a cache (GiB, >= 0); 0 = auto: a GPU rank takes "
        "gpu_memory_fraction of its device less weights and activations, a CPU rank 80% of the "
        "node's available memory shared by the node's ranks")
    gpu_memory_fraction: float = _opt(
        0.9, _number(lo=0, lo_open=True, hi=1),
        "share of a GPU's memory a tier-1 rank may fill (weights, activations, KV cache), in (0, 1]")
    prefill_tokens: int = _opt(
        4096, _integer(lo=1),
        "prompt tokens per pass (>= 1): a pass admits prompts up to this budget beside its "
        "decode rows; a longer prompt is prefilled in chunks of it that share passes with the "
        "decode rows, on tier-1 and tier-2 slots alike (a later chunk is attended where its "
        "slot's KV lives); a prompt with several samples sharing its prefill, or when "
        "generation.prompt_logprobs is on, goes whole")

    def __post_init__(self) -> None:
        _validate(self)
        if self.micro_batch_size and self.hybrid_slots > self.micro_batch_size:
            raise ConfigValueError(
                "topology.hybrid_slots",
                f"topology.hybrid_slots must be <= topology.micro_batch_size "
                f"({self.micro_batch_size}), got {self.hybrid_slots}")


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Process-level settings."""

    SECTION: ClassVar[str] = "runtime"
    torch_threads: int = _opt(
        0, _integer(lo=0),
        "torch threads per rank (>= 0); 0 = auto: the node's CPUs (or Slurm's) split over its ranks by role, each rank pinned to its own cores unless the launcher bound it")
    reply_delay_ms: float = _opt(
        0.0, _number(lo=0),
        "hold every tier-2 reply this long before sending it (ms, >= 0): emulates a network hop "
        "between the tiers; auto micro-batch counts grow with it")
    progress_seconds: float = _opt(
        10.0, _number(lo=0, lo_open=True),
        "interval of rank 0's progress line (seconds, > 0)")
    stall_timeout: float = _opt(
        300.0, _number(lo=0),
        "end the job (exit 76) when no token was produced for this long, naming the ranks waited "
        "on; finished work is saved (seconds, >= 0); 0 = never")

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, slots=True)
class FaultsConfig:
    """Fault injection, for tests of failure handling and resume."""

    SECTION: ClassVar[str] = "faults"
    rank: int = _opt(
        -1, _integer(lo=-1),
        "world rank that fails on purpose (>= -1); -1 = none")
    after_steps: int = _opt(
        0, _integer(lo=0),
        "that rank fails after handling this many steps (messages) (>= 0)")

    def __post_init__(self) -> None:
        _validate(self)


def _section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"doc": cls.__doc__})


@dataclass(frozen=True, slots=True)
class Config:
    """A whole job. `Config()` is the default job."""

    model: ModelConfig = _section(ModelConfig)
    io: IOConfig = _section(IOConfig)
    generation: GenerationConfig = _section(GenerationConfig)
    topology: TopologyConfig = _section(TopologyConfig)
    runtime: RuntimeConfig = _section(RuntimeConfig)
    faults: FaultsConfig = _section(FaultsConfig)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, SECTIONS[f.name]):
                raise ConfigError(
                    f"Config.{f.name} must be a {SECTIONS[f.name].__name__}, got {value!r}")

    @property
    def kv_dtype(self) -> str:
        """The resolved KV-cache dtype: topology.kv_dtype, or model.dtype when that is auto."""
        kv = self.topology.kv_dtype
        return self.model.dtype if kv == "auto" else kv


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "io": IOConfig,
    "generation": GenerationConfig,
    "topology": TopologyConfig,
    "runtime": RuntimeConfig,
    "faults": FaultsConfig,
}


def _keys(section: str) -> list[str]:
    return [f.name for f in fields(SECTIONS[section])]


def _is_str_field(section: str, key: str) -> bool:
    return isinstance(SECTIONS[section].__dataclass_fields__[key].default, str)


# --------------------------------------------------------------------------------------------------
# Loading


def _suggest(name: str, section: str | None) -> str:
    """' (did you mean ...?)' for an unknown name, or a list of what is known."""
    if section is None:
        options = list(SECTIONS)
        close = difflib.get_close_matches(name, options, n=1)
        if close:
            return f" (did you mean '{close[0]}'?)"
        owners = [s for s in SECTIONS if name in _keys(s)]
        if owners:
            return f" (did you mean '{owners[0]}.{name}'?)"
        return f" (sections are: {', '.join(options)})"
    options = _keys(section)
    close = difflib.get_close_matches(name, options, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (keys of '{section}' are: {', '.join(options)})"


def _yaml_error(exc: yaml.YAMLError, where: str) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        return ConfigError(
            f"{where} is not valid YAML: line {mark.line + 1}, column {mark.column + 1}: {problem}")
    return ConfigError(f"{where} is not valid YAML: {problem}")


def _check_duplicates(text: str, where: str) -> None:
    """PyYAML keeps the last of two equal keys silently; a job file with both is a mistake."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)

    def walk(node: yaml.Node, prefix: str, depth: int) -> None:
        if not isinstance(node, yaml.MappingNode) or depth > 1:
            return
        seen: set[str] = set()
        for key_node, value_node in node.value:
            name = str(key_node.value)
            if name in seen:
                raise ConfigError(
                    f"duplicate key '{prefix}{name}' in {where}, line {key_node.start_mark.line + 1}")
            seen.add(name)
            walk(value_node, f"{prefix}{name}.", depth + 1)

    if root is not None:
        walk(root, "", 0)


def _read_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {where} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {where} is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {where} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {where}: {exc.strerror}") from None
    try:
        _check_duplicates(text, f"config file {where}")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, f"config file {where}") from None
    if data is None:  # an empty file, or comments only: the default job
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {where} must be a mapping of sections (model:, io:, generation:, ...), "
            f"got {type(data).__name__}")
    raw: dict[str, dict[str, Any]] = {}
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section '{section}' in {where}{_suggest(str(section), None)}")
        if body is None:  # a section whose keys are all commented out
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(
                f"section '{section}' in {where} must be a mapping of keys, got {body!r}")
        for key in body:
            if key not in _keys(section):
                raise ConfigError(
                    f"unknown key '{section}.{key}' in {where}{_suggest(str(key), section)}")
        raw[section] = dict(body)
    return raw


def parse_override(text: str) -> tuple[str, str, Any]:
    """'generation.top_k=40' -> ('generation', 'top_k', 40); the value is parsed as YAML."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    section, dot, name = key.partition(".")
    if not dot:
        raise ConfigError(f"unknown key '{key}' in --set {text}{_suggest(key, None)}")
    if section not in SECTIONS:
        raise ConfigError(f"unknown section '{section}' in --set {text}{_suggest(section, None)}")
    if name not in _keys(section):
        raise ConfigError(f"unknown key '{key}' in --set {text}{_suggest(name, section)}")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, f"the value of --set {text}") from None
    if _is_str_field(section, name) and (value is None or isinstance(value, (bool, int, float))):
        # A path such as 2024 or 'on' is still a path: keep the text as typed.
        value = value_text.strip()
    return section, name, value


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read a job file (None: defaults only), apply 'section.key=value' overrides, validate.

    Raises ConfigError with one sentence naming the file or --set and the key.
    """
    raw = _read_file(path) if path is not None else {}
    where = os.fspath(path) if path is not None else None
    origin: dict[str, str] = {}  # dotted key -> the --set that set it last
    for text in overrides:
        section, name, value = parse_override(text)
        raw.setdefault(section, {})[name] = value
        origin[f"{section}.{name}"] = text
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        try:
            sections[section] = cls(**raw.get(section, {}))
        except ConfigValueError as exc:
            if exc.key in origin:
                raise ConfigError(f"{exc} (from --set {origin[exc.key]})") from None
            if where is not None:
                raise ConfigError(f"{exc} (in {where})") from None
            raise
    return Config(**sections)


# --------------------------------------------------------------------------------------------------
# Writing


class _Dumper(yaml.SafeDumper):
    """Lists inline (`stop_token_ids: [2, 3]`), mappings as blocks."""


_Dumper.add_representer(
    list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (lists, not tuples), in field order; `Config(**...)`-style loadable."""
    out: dict[str, dict[str, Any]] = {}
    for sf in fields(cfg):
        section = getattr(cfg, sf.name)
        out[sf.name] = {
            f.name: list(v) if isinstance(v := getattr(section, f.name), tuple) else v
            for f in fields(section)
        }
    return out


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML; `load_config` of this text gives `cfg` back."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.dump(value, Dumper=_Dumper, default_flow_style=True).removesuffix("\n...\n").strip()


def config_reference_markdown() -> str:
    """Markdown table of every key: `key | default | meaning`, from the field metadata."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            doc = f.metadata["doc"].replace("|", "\\|")
            lines.append(f"| `{section}.{f.name}` | `{_yaml_scalar(f.default)}` | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(config_reference_markdown())
