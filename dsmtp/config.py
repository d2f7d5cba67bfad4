"""Typed configuration: dataclasses loaded from YAML, overridden from the command line, validated once.

    cfg = load_config("configs/tiny.yaml", overrides=["model.mtp_depth=2", "train.lr=1e-3"])

Every rule about which values fit together lives in `validate`, so a bad config fails before any work
starts, with a message that names the field and says how to fix it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


MTP_KINDS = ("sequential", "parallel")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash")  # model.attention_backend (dsmtp.model.kernels.attention)
ROUTER_DTYPES = ("fp32", "autocast")  # model.router_dtype (dsmtp.model.moe.Router)
# train.optimizer_state_dtype -> bytes per element of each AdamW moment (dsmtp.train.optim keeps them)
OPTIMIZER_STATE_BYTES = {"fp32": 4, "bf16": 2}
OPTIMIZER_STATE_DTYPES = tuple(OPTIMIZER_STATE_BYTES)
PARAM_BYTES = {"fp32": 4, "bf16": 2}  # train.param_dtype -> bytes per parameter and per gradient element
MTP_DEPTH_WEIGHT_SCHEMES = ("uniform", "linear", "exponential")
FP8_BACKENDS = ("torch", "transformer_engine")  # train.fp8_backend (dsmtp.model.fp8)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # train.compile_mode (torch.compile's mode)
MAX_EXPERTS = 2**15 - 1  # routed expert ids are sorted as int16 (dsmtp.model.moe.sort_pairs_by_expert)
TRACKERS = ("jsonl", "tensorboard", "wandb")  # train.trackers' names (writers: dsmtp.train.trackers)
MAX_SIZE = 2**31 - 1  # any model size: a tensor dimension the kernels index with int32


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


@dataclass
class YarnConfig:
    """YaRN context extension (the `rope_scaling` block of the HF config)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 1024
    num_layers: int = 12
    num_heads: int = 16
    first_k_dense_replace: int = 1
    intermediate_size: int = 4096  # dense-layer SwiGLU width
    moe_intermediate_size: int = 512  # width of each routed and shared expert
    n_routed_experts: int = 32
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight; 0 = aux-loss-free only
    q_lora_rank: Optional[int] = None  # None: direct q projection
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    rope_theta: float = 10000.0
    rope_scaling: Optional[YarnConfig] = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    mtp_depth: int = 1  # D: extra tokens predicted (MTP depths); 0 = plain next-token training
    # sequential: DeepSeek-V3's modules, depth k fed the embedding of token i+k; parallel: Gloeckle et
    # al.'s independent heads on the trunk's final hidden state (dsmtp.model.mtp).
    mtp_kind: str = "sequential"
    init_std: float = 0.006
    # Attention kernel on CUDA (not part of the architecture): flash = flash-attn-4 (pip install
    # 'dsmtp[gpu]'; Hopper or newer, bf16/fp16), sdpa = torch's scaled_dot_product_attention, auto =
    # flash where it can run, SDPA elsewhere. CPU runs always take SDPA.
    attention_backend: str = "auto"
    # The router's GEMM (not part of the architecture): fp32 whatever the autocast, as HF transformers'
    # DeepSeek-V3 and torchtitan (for the stability of load balancing); or autocast, the step's compute dtype
    # like every other linear (bf16 on GPU), as DeepSeek-V3's inference/model.py and Megatron-LM's default
    # (moe_router_dtype unset). Sigmoid and top-k stay fp32 either way.
    router_dtype: str = "fp32"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_replace


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    ep: int = 1  # expert parallel (carved out of the data-parallel ranks)
    zero_stage: int = 1
    sequence_parallel: bool = False
    pp_microbatches: Optional[int] = None  # defaults to train.grad_accum
    # Which engine drives training under torchrun: "deepspeed" (ZeRO, for pp == 1), "native"
    # (dsmtp.parallel.native_engine, every layout), or "auto": deepspeed when pp == 1, native when pp > 1.
    engine: str = "auto"

    @property
    def resolved_engine(self) -> str:
        if self.engine == "auto":
            return "deepspeed" if self.pp == 1 else "native"
        return self.engine


SOURCE_KINDS = ("files", "jsonl", "parquet", "hf_disk")
FILES_INCLUDE = ["**/*.py"]
FILES_EXCLUDE = ["**/test/**", "**/tests/**", "**/site-packages/**"]
# What a source that is a directory reads when its include is unset.
KIND_INCLUDE = {"files": FILES_INCLUDE, "jsonl": ["**/*.jsonl", "**/*.jsonl.gz", "**/*.jsonl.zst"],
                "parquet": ["**/*.parquet"], "hf_disk": []}


@dataclass
class SourceConfig:
    """One corpus of data.sources (dsmtp.data.sources reads each kind)."""

    kind: str = "files"  # files (a tree, each file a document) | jsonl (.gz, .zst) | parquet | hf_disk (save_to_disk)
    path: Optional[str] = None  # a file or directory; files: None means the running Python's standard library
    weight: float = 1.0  # training samples are drawn from the sources in proportion to their weights
    text_field: str = "text"  # jsonl, parquet, hf_disk: the key or column holding each document's text
    name: Optional[str] = None  # in the manifest and metrics; None: the path's last part, without extensions
    include: Optional[list[str]] = None  # globs inside a directory path; None: the kind's (KIND_INCLUDE)
    exclude: Optional[list[str]] = None  # None: files: FILES_EXCLUDE; other kinds: none

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        return Path(self.path).name.split(".")[0] if self.path else "stdlib"

    @property
    def globs(self) -> tuple[list[str], list[str]]:
        """(include, exclude) for a directory path."""
        include = KIND_INCLUDE[self.kind] if self.include is None else self.include
        exclude = (FILES_EXCLUDE if self.kind == "files" else []) if self.exclude is None else self.exclude
        return include, exclude


@dataclass
class DataConfig:
    # The corpus: data.sources; when that is empty, the one file tree of source_dir/include/exclude.
    sources: list[SourceConfig] = field(default_factory=list)
    source_dir: Optional[str] = None  # None: the running interpreter's standard library
    include: list[str] = field(default_factory=lambda: list(FILES_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(FILES_EXCLUDE))
    data_dir: str = "data/stdlib"
    val_fraction: float = 0.02
    # "train": learn a BPE model on the train split; or a sentencepiece .model file, an HF tokenizer.json,
    # or a directory holding one (dsmtp.data.tokenizer)
    tokenizer: str = "train"
    tokenizer_sample_bytes: int = 20_000_000
    num_workers: int = 2
    # Keep one file of each content (the first by path): an environment holds vendored copies of the same
    # module, which would otherwise be trained on twice or land on both sides of the train/val split.
    dedup: bool = False

    @property
    def corpus(self) -> list[SourceConfig]:
        """data.sources, or the single file tree they default to."""
        return self.sources or [SourceConfig(kind="files", path=self.source_dir, include=self.include,
                                             exclude=self.exclude)]


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 1234
    seq_len: int = 256
    # Each training sample holds seq_len + 1 + this many tokens (None: model.mtp_depth, what the MTP depths
    # need). Runs to be compared with different depths set it to the largest, so they draw the same windows
    # in the same order (the sample count, hence the shuffle, depends on the sample length).
    sample_extra_tokens: Optional[int] = None
    micro_batch_size: int = 8  # samples per micro-batch over all data-parallel ranks together
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine | constant_decay (DeepSeek: constant, then cosine decay)
    decay_start_fraction: float = 0.8  # constant_decay: where the decay begins
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # Piecewise-constant schedules over tokens seen: [[from_tokens, value], ...] starting at 0.
    mtp_weight_schedule: list[list[float]] = field(default_factory=lambda: [[0, 0.3]])
    # Per-depth weights w_k in lambda * sum_k w_k L_k / sum_k w_k: uniform (DeepSeek-V3), linear
    # (D, D-1, .., 1), exponential (1/2^(k-1)), or a list of model.mtp_depth numbers.
    mtp_depth_weights: Union[str, list[float]] = "uniform"
    # Parallel heads only: run each head's forward and backward before the next head's forward, so peak
    # memory holds one head's activations and logits instead of D (Gloeckle et al., Figure 2).
    mtp_heads_one_at_a_time: bool = False
    bias_update_schedule: list[list[float]] = field(default_factory=lambda: [[0, 0.001]])
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp8
    # train.precision=fp8's GEMMs: torch (dsmtp.model.fp8, tested on the device by tests/gpu) or transformer_engine
    # (te.Linear for the dense layers: no test has run it yet, so it runs only when asked for).
    fp8_backend: str = "torch"
    # AdamW's two moments: fp32, or bf16 as DeepSeek-V3 keeps them (report, section 3.3): half the
    # optimizer memory and fewer bytes streamed per step. Master weights stay fp32 either way.
    optimizer_state_dtype: str = "fp32"
    # The model's parameters and gradients: fp32 (autocast casts each weight to bf16 as it is used), or bf16
    # with fp32 master weights kept by the optimizer, as Megatron-LM's --bf16 does: no weight casts in
    # forward or gradient casts in backward, and the update reads bf16 gradients. One process, one
    # micro-batch a step (gradients accumulated in bf16 would round at every addition).
    param_dtype: str = "fp32"
    # Recompute every N-th transformer layer in backward instead of keeping its activations (0: none,
    # 1: all); trades one extra forward of those layers for their activation memory.
    activation_recompute_every: int = 0
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    save_interval: int = 500
    keep_last: int = 2
    max_skipped_steps: int = 5  # consecutive non-finite steps before the run stops (checked at log and save steps)
    compile: bool = False
    # torch.compile's mode for train.compile. max-autotune-no-cudagraphs times GEMM templates against the
    # libraries' and tunes each fused kernel's launch parameters while compiling (minutes longer, once a
    # run); CUDA graphs stay train.cuda_graph's job.
    compile_mode: str = "default"
    # Replay each step's forward and backward as one CUDA graph (dsmtp.train.cuda_graph; one process on
    # CUDA): the host launches one graph instead of thousands of kernels, with the same arithmetic as eager
    # (tests/gpu/test_gpu_train.py; its speed: notes/code-measurements.md).
    cuda_graph: bool = False
    # Run the optimizer update on a side stream, layer by layer in forward order, while the next step's
    # forward runs: each layer waits only for its own parameters (dsmtp.train.overlap; one process on CUDA,
    # dsmtp's own AdamW: train.optimizer_state_dtype or train.param_dtype bf16). Same arithmetic as in turn.
    overlap_update: bool = False
    # Where the training and eval records go: metrics.jsonl always; "tensorboard" and "wandb" add writers
    # of the same records (dsmtp.train.trackers; pip install 'dsmtp[tracking]').
    trackers: list[str] = field(default_factory=lambda: ["jsonl"])
    # Training refuses a run whose estimated memory (dsmtp.model.params.training_memory) exceeds what the
    # device has free; an expert who knows better (offload, a shared node about to free memory) skips it.
    skip_memory_check: bool = False


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the server prints the one it got)
    max_batch_size: int = 8
    max_new_tokens: int = 512
    max_body_bytes: int = 1_000_000
    max_choices: int = 64  # per request: prompts x n
    served_model_name: Optional[str] = None  # the model's name in the API; None: the --ckpt path


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# ----------------------------------------------------------------------------------------------
# Loading


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Turn a YAML value into the annotated type, or raise a ConfigError naming `path`."""
    origin = get_origin(hint)
    if origin is Union:  # Optional[X], or one of several forms (the first that fits)
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(get_args(hint)):
            return None
        if len(args) == 1:
            return _coerce(value, args[0], path)
        for arg in args:
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        forms = " or ".join("a list" if get_origin(a) is list else f"a {getattr(a, '__name__', a)}" for a in args)
        raise ConfigError(f"{path}: expected {forms}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return _from_dict(hint, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = get_args(hint)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint in (int, float) and isinstance(value, str):
        value = _parse_number(value)  # PyYAML reads 1e12 (no dot, no sign) as a string
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= 1e308:
            raise ConfigError(f"{path}: expected a finite number, got {str(value)[:40]}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _parse_number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text  # not a number: the type check below names the field


def _shown(text: Any) -> str:
    """A user's key or value inside a one-line message: as typed when printable, escaped otherwise."""
    text = str(text)
    return text if text.isprintable() else repr(text)


def _from_dict(cls: type, data: dict, path: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(_shown(key) for key in set(data) - names)
    if unknown:
        prefix = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}: {cls.__name__} has fields {sorted(names)} "
            "(check the spelling)"
        )
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {_shown(dotted)}: {_shown(key)} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.mtp_depth=2", "train.lr=1e-3"]` -> nested dict; values are parsed as YAML."""
    data: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. model.mtp_depth=2")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {_shown(item)}: the value is not valid YAML ({_yaml_problem(e)})") from None
        _set_path(data, key.strip(), value)
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _upgrade(data: dict) -> dict:
    """Configs written before train.activation_recompute_every (checkpoints keep theirs) carry the
    never-implemented train.activation_checkpointing flag: true meant every layer."""
    train = data.get("train")
    if isinstance(train, dict) and "activation_checkpointing" in train:
        train = dict(train)
        train.setdefault("activation_recompute_every", int(bool(train.pop("activation_checkpointing"))))
        data = {**data, "train": train}
    return data


def _yaml_problem(error: yaml.YAMLError, where: bool = False) -> str:
    """What PyYAML found wrong, on one line; with `where`, the line and column first."""
    mark = getattr(error, "problem_mark", None)
    text = getattr(error, "problem", None) or str(error)
    if where and mark is not None:
        text = f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    return " ".join(text.split())


def config_from_dict(data: dict) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"a config is a mapping of sections (model, parallel, data, train, serve), "
                          f"got {repr(data)[:80]}")
    cfg = _from_dict(Config, _upgrade(data), "")
    validate(cfg)
    return cfg


def _read_mapping(path: Union[str, Path], sections: str) -> dict:
    """A YAML config file's mapping, or a ConfigError naming the file (`sections`: what it should hold)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see configs/ for the shipped ones)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({_yaml_problem(e, where=True)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({sections})")
    return data


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> Config:
    data = {} if path is None else _read_mapping(path, "model, parallel, data, train, serve")
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Validation: the one place that knows which values fit together.


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _divisors(n: int) -> list[int] | str:
    """The divisors of n to suggest in a message (n's own name when there are too many to list)."""
    if n > 10**6:
        return f"the divisors of {n}"
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_model(m: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "moe_intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                 "max_position_embeddings"):
        _require(getattr(m, name) > 0, f"model.{name}={getattr(m, name)} must be positive")
    for f in dataclasses.fields(m):  # every integer of the model is a size or a count
        value = getattr(m, f.name)
        _require(not isinstance(value, int) or value <= MAX_SIZE, f"model.{f.name}={value} must be at most {MAX_SIZE}")
    _require(m.qk_rope_head_dim > 0 and m.qk_rope_head_dim % 2 == 0,
             f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be a positive even number (RoPE rotates pairs)")
    _require(m.mtp_depth >= 0, f"model.mtp_depth={m.mtp_depth} must be >= 0 (0 disables MTP)")
    _require(m.mtp_kind in MTP_KINDS, f"model.mtp_kind={m.mtp_kind!r} must be one of {', '.join(MTP_KINDS)}")
    _require(m.attention_backend in ATTENTION_BACKENDS,
             f"model.attention_backend={m.attention_backend!r} must be one of {', '.join(ATTENTION_BACKENDS)}")
    _require(m.router_dtype in ROUTER_DTYPES,
             f"model.router_dtype={m.router_dtype!r} must be one of {', '.join(ROUTER_DTYPES)}")
    _require(0 <= m.first_k_dense_replace <= m.num_layers,
             f"model.first_k_dense_replace={m.first_k_dense_replace} must be in [0, num_layers={m.num_layers}]")
    _require(m.q_lora_rank is None or m.q_lora_rank > 0,
             f"model.q_lora_rank={m.q_lora_rank} must be positive, or null for a direct q projection")
    _require(m.rms_norm_eps > 0, f"model.rms_norm_eps={m.rms_norm_eps} must be positive")
    _require(m.aux_loss_alpha >= 0, f"model.aux_loss_alpha={m.aux_loss_alpha} must be >= 0")
    if m.num_moe_layers == 0 and m.mtp_depth == 0:
        return
    _require(0 < m.n_routed_experts <= MAX_EXPERTS,
             f"model.n_routed_experts={m.n_routed_experts} must be between 1 and {MAX_EXPERTS} (expert ids are "
             f"sorted as int16)")
    _require(m.n_shared_experts >= 0, f"model.n_shared_experts={m.n_shared_experts} must be >= 0")
    _require(m.n_group > 0 and m.n_routed_experts % m.n_group == 0,
             f"model.n_routed_experts={m.n_routed_experts} is not divisible by model.n_group={m.n_group}: "
             f"choose n_group from {_divisors(m.n_routed_experts)}")
    per_group = m.n_routed_experts // m.n_group
    _require(per_group >= 2,
             f"model.n_group={m.n_group} leaves {per_group} expert per group; groups are ranked by their top-2 "
             "scores, so use fewer groups (or at least 2 routed experts)")
    _require(1 <= m.topk_group <= m.n_group,
             f"model.topk_group={m.topk_group} must be in [1, model.n_group={m.n_group}]")
    available = m.topk_group * per_group
    _require(1 <= m.num_experts_per_tok <= available,
             f"model.num_experts_per_tok={m.num_experts_per_tok} exceeds the {available} experts left after "
             f"group limiting (topk_group={m.topk_group} x {per_group} per group): lower it or raise topk_group")
    _require(m.routed_scaling_factor > 0, f"model.routed_scaling_factor={m.routed_scaling_factor} must be positive")
    if m.rope_scaling is not None:
        _require(m.rope_scaling.factor >= 1, f"model.rope_scaling.factor={m.rope_scaling.factor} must be >= 1")


def validate_schedule(name: str, schedule: list[list[float]]) -> None:
    _require(len(schedule) > 0, f"train.{name} must have at least one [from_tokens, value] entry")
    for i, entry in enumerate(schedule):
        _require(len(entry) == 2, f"train.{name}[{i}]={entry} must be a pair [from_tokens, value]")
    starts = [e[0] for e in schedule]
    _require(starts[0] == 0, f"train.{name} must start at 0 tokens, got {starts[0]}")
    _require(starts == sorted(starts), f"train.{name} must be sorted by from_tokens, got {starts}")


def validate_mtp_training(m: ModelConfig, t: TrainConfig) -> None:
    weights = t.mtp_depth_weights
    if isinstance(weights, str):
        _require(weights in MTP_DEPTH_WEIGHT_SCHEMES,
                 f"train.mtp_depth_weights={weights!r} must be one of {', '.join(MTP_DEPTH_WEIGHT_SCHEMES)} or a "
                 f"list of model.mtp_depth={m.mtp_depth} numbers")
    else:
        _require(len(weights) == m.mtp_depth,
                 f"train.mtp_depth_weights has {len(weights)} numbers but model.mtp_depth={m.mtp_depth}: give one "
                 "weight per depth, or a scheme (uniform, linear, exponential)")
        _require(all(w >= 0 for w in weights) and (not weights or sum(weights) > 0),
                 f"train.mtp_depth_weights={weights} must be >= 0 with a positive sum (they are normalised by it)")
    _require(not t.mtp_heads_one_at_a_time or (m.mtp_kind == "parallel" and m.mtp_depth > 0),
             f"train.mtp_heads_one_at_a_time=true needs model.mtp_kind=parallel with model.mtp_depth >= 1 (got "
             f"mtp_kind={m.mtp_kind}, mtp_depth={m.mtp_depth}): sequential depths feed each other, so they cannot "
             "run one at a time; set it to false")


def validate_sources(d: DataConfig) -> None:
    _require(not (d.sources and d.source_dir is not None),
             f"data.source_dir={d.source_dir} and data.sources are both set: list the tree as a source "
             "({kind: files, path: ...}) or drop data.sources")
    names: dict[str, int] = {}
    for i, s in enumerate(d.corpus):
        where = f"data.sources[{i}]"
        _require(s.kind in SOURCE_KINDS,
                 f"{where}.kind={_shown(s.kind)!r} is not a source kind: choose {', '.join(SOURCE_KINDS)}")
        _require(s.path is not None or s.kind == "files",
                 f"{where}.path is missing: a {s.kind} source needs the path of its file or directory")
        _require(s.weight >= 0, f"{where}.weight={s.weight} must be >= 0 (0 prepares the source but draws nothing)")
        _require(s.text_field != "", f"{where}.text_field is empty: name the key or column that holds the text")
        _require(s.include is None or len(s.include) > 0,
                 f"{where}.include is an empty list: give globs, or leave it unset for the kind's default")
        _require(s.label != "" and s.label.isprintable(), f"{where}.name={s.label!r} must be a printable name")
        _require(s.label not in names, f"data.sources[{names.get(s.label)}] and {where} are both named "
                                       f"{s.label!r}: give one a different data.sources[i].name")
        names[s.label] = i
    _require(sum(s.weight for s in d.corpus) > 0, "data.sources weights are all 0: give at least one a positive weight")
    _require(d.tokenizer != "", "data.tokenizer is empty: use train, or the path of a tokenizer.model/tokenizer.json")


def validate_parallel(cfg: Config) -> None:
    """The layout's rules that hold for any world size: what each engine supports (dsmtp.parallel)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for name in ("tp", "pp", "ep"):
        _require(getattr(p, name) >= 1, f"parallel.{name}={getattr(p, name)} must be >= 1")
    _require(m.num_heads % p.tp == 0,
             f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}: choose tp from "
             f"{_divisors(m.num_heads)}")
    _require(p.ep == 1 or m.num_moe_layers > 0 or m.mtp_depth > 0,
             f"parallel.ep={p.ep} needs MoE layers: the model has none (set parallel.ep=1)")
    _require(m.n_routed_experts % p.ep == 0,
             f"model.n_routed_experts={m.n_routed_experts} is not divisible by parallel.ep={p.ep}: choose ep from "
             f"{_divisors(m.n_routed_experts)}")
    _require(p.pp <= m.num_layers,
             f"parallel.pp={p.pp} is larger than model.num_layers={m.num_layers}: each stage needs a layer")
    _require(p.engine in ("auto", "native", "deepspeed"),
             f"parallel.engine={p.engine!r} must be auto, native or deepspeed")
    _require(p.pp == 1 or p.engine != "deepspeed",
             f"parallel.engine=deepspeed cannot be used with parallel.pp={p.pp}: DeepSpeed's pipeline engine cannot "
             "carry the MTP inputs and per-stage aux losses; use parallel.engine=native (or auto) for pp > 1")
    deepspeed = p.resolved_engine == "deepspeed"
    if p.zero_stage == 3:
        experts = (f" and routed experts (model.num_layers={m.num_layers} > first_k_dense_replace="
                   f"{m.first_k_dense_replace}): DeepSpeed's ZeRO-3 refuses MoE parameters, and" if deepspeed
                   and m.num_moe_layers > 0 else ":")
        _require(False, f"parallel.zero_stage=3 with parallel.engine={p.engine}{experts} neither engine shards the "
                        "parameters themselves (dsmtp's checkpoints, tensor, expert and pipeline parallelism hold whole "
                        "parameter slices on each rank): use zero_stage 1 or 2")
    _require(p.zero_stage in (0, 1, 2), f"parallel.zero_stage={p.zero_stage} must be 0, 1 or 2")
    _require(p.pp == 1 or p.zero_stage <= 1,
             f"parallel.zero_stage={p.zero_stage} cannot be used with parallel.pp={p.pp}: pipeline layouts run on "
             "dsmtp's native engine, which shards gradients (stage 2) only without pipeline parallelism (the first "
             "and last stages sum the tied embedding's whole gradient); use zero_stage 0 or 1 with pp > 1")
    _require(not (deepspeed and p.zero_stage == 0),
             f"parallel.zero_stage=0 with parallel.engine={p.engine} (DeepSpeed, as pp == 1): dsmtp drives DeepSpeed's "
             "ZeRO optimizer only; use zero_stage 1 (parameters and gradients as in stage 0, optimizer state "
             "sharded) or parallel.engine=native")
    _require(p.pp_microbatches is None or p.pp_microbatches == t.grad_accum,
             f"parallel.pp_microbatches={p.pp_microbatches} differs from train.grad_accum={t.grad_accum}: "
             "the pipeline's micro-batches are the accumulation steps; leave pp_microbatches unset")
    _require(p.tp > 1 or not p.sequence_parallel, "parallel.sequence_parallel needs parallel.tp > 1")
    _require(not (p.sequence_parallel and p.pp > 1),
             f"parallel.sequence_parallel with parallel.pp={p.pp}: the pipeline sends whole-sequence "
             "activations between stages; use sequence_parallel with pp=1, or set it to false")
    _require(not p.sequence_parallel or t.seq_len % p.tp == 0,
             f"parallel.sequence_parallel splits train.seq_len={t.seq_len} over parallel.tp={p.tp} ranks: choose a "
             f"seq_len divisible by {p.tp}, or set sequence_parallel to false")


def validate_world(cfg: Config, world_size: int) -> int:
    """The layout over `world_size` processes started by a launcher, each driving an engine
    (dsmtp.parallel.rank.build_engine); returns the data-parallel size."""
    p, t = cfg.parallel, cfg.train
    _require(not t.cuda_graph, "train.cuda_graph=true replays the single-process step, not a step under torchrun: "
                               "set it to false")
    _require(t.param_dtype == "fp32", f"train.param_dtype={t.param_dtype} keeps master weights in the single-process "
                                      "optimizer, not under torchrun: set it to fp32")
    _require(not t.overlap_update, "train.overlap_update=true overlaps the single-process step, not a step under "
                                   "torchrun: set it to false")
    _require(not (p.resolved_engine == "deepspeed" and t.optimizer_state_dtype != "fp32"),
             f"train.optimizer_state_dtype={t.optimizer_state_dtype} under DeepSpeed (parallel.engine={p.engine}): "
             "its ZeRO optimizer keeps the moments in fp32 partitions of its own; use parallel.engine=native, or "
             "train.optimizer_state_dtype=fp32")
    model_parallel = p.tp * p.pp
    _require(world_size % model_parallel == 0,
             f"world size {world_size} is not a multiple of parallel.tp={p.tp} x parallel.pp={p.pp} = "
             f"{model_parallel}: launch a multiple of {model_parallel} processes or change tp/pp")
    dp = world_size // model_parallel
    _require(dp % p.ep == 0,
             f"parallel.ep={p.ep} does not divide the data-parallel size {dp} (= world {world_size} / (tp x pp)): "
             f"expert parallelism is carved out of the data-parallel ranks; choose ep from the divisors of {dp}")
    _require(t.micro_batch_size % dp == 0,
             f"train.micro_batch_size={t.micro_batch_size} is not divisible by the data-parallel size {dp}: it is "
             "the micro-batch of all DP ranks together (each reads micro_batch_size / dp samples), so the global "
             "batch is the same in every layout; choose a multiple of the DP size")
    return dp


def validate(cfg: Config, world_size: Optional[int] = None) -> Optional[int]:
    """Refuse a config whose values do not fit together, naming the field and the fix.

    With `world_size` (the launcher's process count, known once a job starts), also the rules of the
    parallel layout over that many processes; returns the data-parallel size then (None without)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    validate_model(m)
    validate_parallel(cfg)
    for name in ("seq_len", "micro_batch_size", "grad_accum", "steps", "log_interval", "eval_interval",
                 "eval_batches", "save_interval", "keep_last", "max_skipped_steps"):
        _require(getattr(t, name) >= 1, f"train.{name}={getattr(t, name)} must be >= 1")
    _require(t.seq_len <= m.max_position_embeddings,
             f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    _require(0 <= t.seed < 2**63, f"train.seed={t.seed} must be in [0, 2^63)")
    _require(0 <= t.warmup_steps <= t.steps, f"train.warmup_steps={t.warmup_steps} must be in [0, train.steps={t.steps}]")
    _require(t.lr > 0 and 0 <= t.min_lr <= t.lr, f"train.lr={t.lr} and train.min_lr={t.min_lr} need 0 <= min_lr <= lr, lr > 0")
    _require(t.lr_schedule in ("cosine", "constant_decay"),
             f"train.lr_schedule={t.lr_schedule!r} must be 'cosine' or 'constant_decay'")
    _require(0 <= t.decay_start_fraction <= 1, f"train.decay_start_fraction={t.decay_start_fraction} must be in [0, 1]")
    _require(t.precision in ("auto", "fp32", "bf16", "fp8"),
             f"train.precision={t.precision!r} must be one of auto, fp32, bf16, fp8")
    _require(t.fp8_backend in FP8_BACKENDS,
             f"train.fp8_backend={t.fp8_backend!r} must be one of {', '.join(FP8_BACKENDS)}")
    _require(t.fp8_backend == "torch" or t.precision == "fp8",
             f"train.fp8_backend={t.fp8_backend} applies to train.precision=fp8 only (got {t.precision}): set "
             "train.precision=fp8 or train.fp8_backend=torch")
    _require(not (m.attention_backend == "flash" and t.precision == "fp32"),
             "model.attention_backend=flash computes in bf16, and train.precision=fp32 runs attention in fp32: "
             "set train.precision to bf16 (or auto), or model.attention_backend to auto or sdpa")
    _require(t.compile_mode in COMPILE_MODES,
             f"train.compile_mode={t.compile_mode!r} must be one of {', '.join(COMPILE_MODES)}")
    _require(t.compile or t.compile_mode == "default",
             f"train.compile_mode={t.compile_mode} applies to compiled layers only: set train.compile=true, "
             "or leave train.compile_mode at default")
    _require(t.optimizer_state_dtype in OPTIMIZER_STATE_DTYPES,
             f"train.optimizer_state_dtype={t.optimizer_state_dtype!r} must be one of {', '.join(OPTIMIZER_STATE_DTYPES)}")
    _require(t.param_dtype in PARAM_BYTES,
             f"train.param_dtype={t.param_dtype!r} must be one of {', '.join(PARAM_BYTES)}")
    _require(t.param_dtype == "fp32" or (t.precision in ("bf16", "fp8") and t.grad_accum == 1),
             f"train.param_dtype={t.param_dtype} computes under bf16 autocast and keeps one micro-batch's gradients "
             f"(got train.precision={t.precision}, train.grad_accum={t.grad_accum}): set train.precision to bf16 or "
             "fp8 and train.grad_accum to 1, or train.param_dtype to fp32")
    _require(t.activation_recompute_every >= 0,
             f"train.activation_recompute_every={t.activation_recompute_every} must be >= 0 (0: keep all "
             "activations, 1: recompute every layer, N: every N-th layer)")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    _require(not t.overlap_update or "bf16" in (t.optimizer_state_dtype, t.param_dtype),
             "train.overlap_update=true steps dsmtp's own AdamW layer by layer, which train.optimizer_state_dtype=fp32 "
             "with train.param_dtype=fp32 does not use (torch's fused AdamW): set train.optimizer_state_dtype=bf16, or "
             "train.overlap_update=false")
    _require(not (t.overlap_update and t.cuda_graph),
             "train.overlap_update=true with train.cuda_graph=true: a replayed graph's forward does not wait for the "
             "update's stages and reads stale weights: set train.cuda_graph=false or train.overlap_update=false")
    _require(not t.overlap_update or p.tp == p.pp == p.ep == 1,
             f"train.overlap_update=true overlaps the single-process step, not a tp={p.tp} pp={p.pp} ep={p.ep} layout: "
             "set train.overlap_update=false or parallel.tp, pp and ep to 1")
    _require(not t.cuda_graph or p.tp == p.pp == p.ep == 1,
             f"train.cuda_graph=true replays the single-process step, not a tp={p.tp} pp={p.pp} ep={p.ep} layout: "
             "set train.cuda_graph=false or parallel.tp, pp and ep to 1")
    for i, name in enumerate(t.trackers):
        _require(name in TRACKERS, f"train.trackers[{i}]={name!r} is not a tracker: choose from "
                                   f"{', '.join(TRACKERS)} (jsonl is always written)")
        _require(name not in t.trackers[:i], f"train.trackers lists {name!r} twice: list each tracker once")
    validate_schedule("mtp_weight_schedule", t.mtp_weight_schedule)
    validate_mtp_training(m, t)
    _require(t.sample_extra_tokens is None or t.sample_extra_tokens >= m.mtp_depth,
             f"train.sample_extra_tokens={t.sample_extra_tokens} is below model.mtp_depth={m.mtp_depth}: the "
             "deepest MTP depth needs that many tokens past each sample; raise it or leave it unset")
    validate_schedule("bias_update_schedule", t.bias_update_schedule)
    _require(all(e[1] >= 0 for e in t.bias_update_schedule), "train.bias_update_schedule values must be >= 0")

    d = cfg.data
    _require(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    _require(d.num_workers >= 1, f"data.num_workers={d.num_workers} must be >= 1")
    _require(len(d.include) > 0, "data.include must list at least one glob, e.g. ['**/*.py']")
    validate_sources(d)

    s = cfg.serve
    _require(0 <= s.port <= 65535, f"serve.port={s.port} must be in [0, 65535] (0: any free port)")
    _require(s.max_batch_size >= 1 and s.max_new_tokens >= 1,
             "serve.max_batch_size and serve.max_new_tokens must be >= 1")
    _require(s.max_body_bytes >= 1, f"serve.max_body_bytes={s.max_body_bytes} must be >= 1")
    _require(s.max_choices >= 1, f"serve.max_choices={s.max_choices} must be >= 1")
    _require(s.served_model_name is None or s.served_model_name.strip() == s.served_model_name != "",
             f"serve.served_model_name={s.served_model_name!r} must be a non-empty name without surrounding spaces")
    return None if world_size is None else validate_world(cfg, world_size)


def piecewise(schedule: list[list[float]], tokens: float) -> float:
    """Value of a piecewise-constant [[from_tokens, value], ...] schedule after `tokens` tokens."""
    value = schedule[0][1]
    for start, v in schedule:
        if tokens >= start:
            value = v
    return float(value)



# ----------------------------------------------------------------------------------------------
# Studies (`dsmtp study`, dsmtp.study): arms that differ only in the MTP objective.

HUMANEVAL_PROBLEMS = 164
# What an arm sets; the study sets seed, out_dir and sample_extra_tokens; the base config sets everything else.
ARM_FIELDS = {"model": ("mtp_kind", "mtp_depth"),
              "train": ("mtp_weight_schedule", "mtp_depth_weights", "mtp_heads_one_at_a_time", "seed", "out_dir",
                        "sample_extra_tokens")}


@dataclass
class StudyArm:
    """One training objective: the MTP design and depth, and how the depths are weighted."""

    name: str
    mtp_kind: str = "sequential"
    mtp_depth: int = 0  # 0: plain next-token training, the baseline every difference is taken against
    mtp_depth_weights: Union[str, list[float]] = "uniform"
    mtp_heads_one_at_a_time: bool = False
    seeds: Optional[list[int]] = None  # None: the study's seeds


@dataclass
class StudyEval:
    """What each arm is measured on after training (dsmtp.study.evaluate)."""

    # Starts of the context-position buckets of the validation loss; the last bucket runs to train.seq_len.
    position_buckets: list[int] = field(default_factory=lambda: [0, 128, 512, 1024])
    val_max_tokens: Optional[int] = None  # None: the whole validation split
    micro_batch_size: int = 8
    humaneval_problems: Optional[int] = None  # the first N problems (None: all 164)
    humaneval_max_new_tokens: int = 384
    humaneval_batch_size: int = 16
    humaneval_timeout_s: float = 5.0  # per program, wall clock
    exec_workers: int = 8  # programs run at once
    decode_prompts: int = 8  # the first N HumanEval prompts, decoded at batch 1
    decode_new_tokens: int = 128
    decode_repeats: int = 2  # best of N timed passes, after a warm-up


@dataclass
class StudyConfig:
    name: str
    out_dir: str  # each arm and seed trains in out_dir/<arm>-s<seed>
    base: Config  # everything the arms share; the arm fields (ARM_FIELDS) come from the study
    arms: list[StudyArm]
    seeds: list[int] = field(default_factory=lambda: [0])
    # lambda over the token budget: [[from_fraction, value], ...]. DeepSeek-V3: 0.3 for its first 10T of
    # 14.8T tokens, then 0.1.
    mtp_weight_by_fraction: list[list[float]] = field(default_factory=lambda: [[0.0, 0.3], [0.676, 0.1]])
    # Refuse a token budget larger than the train split (a repeated token is not a new one) unless true.
    allow_repeated_tokens: bool = False
    eval: StudyEval = field(default_factory=StudyEval)

    def arm(self, name: str) -> StudyArm:
        return next(a for a in self.arms if a.name == name)

    def arm_seeds(self, arm: StudyArm) -> list[int]:
        return self.seeds if arm.seeds is None else arm.seeds


def tokens_per_run(t: TrainConfig) -> int:
    return t.steps * t.micro_batch_size * t.seq_len * t.grad_accum


def arm_config(study: StudyConfig, arm: StudyArm, seed: int) -> Config:
    """The full config of one arm and seed: the base with the arm's objective, the study's lambda schedule
    in tokens, the seed (initialisation and data order), and samples long enough for the deepest arm."""
    cfg = dataclasses.replace(study.base, model=dataclasses.replace(study.base.model),
                              train=dataclasses.replace(study.base.train))
    m, t = cfg.model, cfg.train
    m.mtp_kind, m.mtp_depth = arm.mtp_kind, arm.mtp_depth
    t.mtp_depth_weights, t.mtp_heads_one_at_a_time = arm.mtp_depth_weights, arm.mtp_heads_one_at_a_time
    t.mtp_weight_schedule = [[round(f * tokens_per_run(t)), v] for f, v in study.mtp_weight_by_fraction]
    t.sample_extra_tokens = max(a.mtp_depth for a in study.arms)
    t.seed = seed
    t.out_dir = str(Path(study.out_dir) / f"{arm.name}-s{seed}")
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"arm {arm.name} (seed {seed}): {e}") from None
    return cfg


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "_.-" for c in name) and not name.startswith(".")


def validate_study(s: StudyConfig) -> None:
    _require(_safe_name(s.name), f"name={_shown(s.name)} must be a non-empty name of letters, digits, _ . -")
    _require(len(s.arms) > 0, "arms must list at least one arm")
    names = [a.name for a in s.arms]
    for i, arm in enumerate(s.arms):
        _require(_safe_name(arm.name), f"arms[{i}].name={_shown(arm.name)} must be a name of letters, digits, _ . -")
        _require(arm.name not in names[:i], f"arms[{i}].name={arm.name} is used twice: give each arm its own name")
        _require(arm.seeds is None or len(arm.seeds) > 0, f"arms[{i}].seeds is empty: list a seed, or leave it "
                                                          "unset for the study's seeds")
    _require(sum(a.mtp_depth == 0 for a in s.arms) == 1,
             f"arms need exactly one arm with mtp_depth 0 (next-token training, the baseline every difference is "
             f"taken against); got {sum(a.mtp_depth == 0 for a in s.arms)}")
    for what, seeds in [("seeds", s.seeds)] + [(f"arms.{a.name}.seeds", a.seeds) for a in s.arms if a.seeds]:
        _require(len(seeds) > 0 and len(set(seeds)) == len(seeds), f"{what}={seeds} must list distinct seeds")
    fractions = s.mtp_weight_by_fraction
    _require(len(fractions) > 0 and all(len(e) == 2 for e in fractions) and fractions[0][0] == 0
             and [f for f, _ in fractions] == sorted(f for f, _ in fractions)
             and all(0 <= f <= 1 and v >= 0 for f, v in fractions),
             f"mtp_weight_by_fraction={fractions} must be [[from_fraction, lambda], ...] pairs starting at 0, with "
             "rising fractions of the token budget in [0, 1] and lambda >= 0, e.g. [[0, 0.3], [0.676, 0.1]]")
    e, seq_len = s.eval, s.base.train.seq_len
    b = e.position_buckets
    _require(len(b) > 0 and b[0] == 0 and b == sorted(set(b)) and b[-1] < seq_len,
             f"eval.position_buckets={b} must start at 0 and rise, below train.seq_len={seq_len}")
    _require(e.val_max_tokens is None or e.val_max_tokens >= seq_len,
             f"eval.val_max_tokens={e.val_max_tokens} must be at least train.seq_len={seq_len}, or null (all)")
    _require(e.humaneval_problems is None or 1 <= e.humaneval_problems <= HUMANEVAL_PROBLEMS,
             f"eval.humaneval_problems={e.humaneval_problems} must be in [1, {HUMANEVAL_PROBLEMS}], or null (all)")
    for name in ("humaneval_max_new_tokens", "decode_new_tokens"):
        value = getattr(e, name)
        _require(1 <= value < seq_len, f"eval.{name}={value} must be in [1, train.seq_len={seq_len}): a prompt "
                                       "needs room in the context too")
    for name in ("micro_batch_size", "humaneval_batch_size", "exec_workers", "decode_prompts", "decode_repeats"):
        _require(getattr(e, name) >= 1, f"eval.{name}={getattr(e, name)} must be >= 1")
    _require(e.humaneval_timeout_s > 0, f"eval.humaneval_timeout_s={e.humaneval_timeout_s} must be positive")
    for arm in s.arms:
        for seed in s.arm_seeds(arm):
            arm_config(s, arm, seed)


def study_from_dict(data: dict) -> StudyConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a study config is a mapping (name, out_dir, base, arms, ...), got {repr(data)[:80]}")
    missing = [key for key in ("name", "out_dir", "base", "arms") if key not in data]
    _require(not missing, f"the study config has no {missing[0] if missing else ''}: a study names itself (name), "
                          "its output dir (out_dir), the shared config (base) and its arms")
    base = data.get("base")
    for section, names in ARM_FIELDS.items():
        given = sorted(set(names) & set(base.get(section) or {})) if isinstance(base, dict) else []
        _require(not given, f"base.{section}.{given[0] if given else ''} is set by the study, not the base: arms "
                            "set the MTP objective (mtp_kind, mtp_depth, mtp_depth_weights, mtp_heads_one_at_a_time), "
                            "the study the seeds, lambda (mtp_weight_by_fraction), out_dir and the sample length")
    study = _from_dict(StudyConfig, data, "")
    validate_study(study)
    return study


def load_study_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> StudyConfig:
    """A study config file with `--set` overrides (e.g. base.data.source_dir=/path) applied."""
    data = _read_mapping(path, "name, out_dir, base, arms, seeds, mtp_weight_by_fraction, eval")
    return study_from_dict(_merge(data, parse_overrides(overrides or [])))
