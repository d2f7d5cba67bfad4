from pathlib import Path

import pytest

from dsmtp.config import Config, ConfigError, config_from_dict, load_config, piecewise

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "small.yaml", "deepseek_v3_671b.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)


def test_overrides_are_typed_and_nested():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.mtp_depth=3", "train.lr=1e-3", "model.q_lora_rank=null",
                                              "train.mtp_weight_schedule=[[0, 0.3], [1e6, 0.1]]"])
    assert cfg.model.mtp_depth == 3
    assert cfg.train.lr == 1e-3
    assert cfg.model.q_lora_rank is None
    assert cfg.train.mtp_weight_schedule == [[0.0, 0.3], [1e6, 0.1]]


def test_671b_schedule_reads_exponent_numbers():
    cfg = load_config(CONFIGS / "deepseek_v3_671b.yaml")
    assert piecewise(cfg.train.mtp_weight_schedule, 9.9e12) == 0.3
    assert piecewise(cfg.train.mtp_weight_schedule, 10e12) == 0.1
    assert piecewise(cfg.train.bias_update_schedule, 14.3e12) == 0.0


@pytest.mark.parametrize("data, field", [
    ({"model": {"num_heads": 6}, "parallel": {"tp": 4}}, "model.num_heads=6 is not divisible by parallel.tp=4"),
    ({"model": {"n_routed_experts": 12, "n_group": 5}}, "not divisible by model.n_group=5"),
    ({"model": {"n_routed_experts": 32}, "parallel": {"ep": 3}}, "not divisible by parallel.ep=3"),
    ({"model": {"n_routed_experts": 40000, "n_group": 1, "topk_group": 1}}, "must be between 1 and 32767"),
    ({"model": {"topk_group": 5, "n_group": 4}}, "model.topk_group=5"),
    ({"model": {"num_experts_per_tok": 17, "n_routed_experts": 32, "n_group": 4, "topk_group": 2}},
     "model.num_experts_per_tok=17 exceeds the 16 experts"),
    ({"model": {"mtp_depth": -1}}, "model.mtp_depth=-1"),
    ({"model": {"mtp_dept": 1}}, "unknown config key model.mtp_dept"),
    ({"modle": {}}, "unknown config key modle"),
    ({"model": {"hidden_size": "big"}}, "model.hidden_size: expected an integer"),
    ({"parallel": {"pp": 2, "zero_stage": 2}}, "parallel.zero_stage=2 cannot be used with parallel.pp=2"),
    ({"parallel": {"pp": 13}}, "parallel.pp=13 is larger than model.num_layers=12"),
    ({"parallel": {"engine": "megatron"}}, "parallel.engine='megatron' must be auto, native or deepspeed"),
    ({"parallel": {"pp": 2, "engine": "deepspeed"}}, "parallel.engine=deepspeed cannot be used with parallel.pp=2"),
    ({"parallel": {"zero_stage": 3}}, "parallel.zero_stage=3 with parallel.engine=auto and routed experts"),
    ({"parallel": {"zero_stage": 0}}, "parallel.zero_stage=0 with parallel.engine=auto"),
    ({"train": {"mtp_weight_schedule": [[5, 0.3]]}}, "train.mtp_weight_schedule must start at 0"),
    ({"train": {"seq_len": 8192}}, "train.seq_len=8192 exceeds model.max_position_embeddings=4096"),
    ({"train": {"compile": True, "compile_mode": "max-autotune"}},
     "train.compile_mode='max-autotune' must be one of default, max-autotune-no-cudagraphs"),
    ({"train": {"compile_mode": "max-autotune-no-cudagraphs"}},
     "train.compile_mode=max-autotune-no-cudagraphs applies to compiled layers only: set train.compile=true"),
    ({"model": {"router_dtype": "bf16"}}, "model.router_dtype='bf16' must be one of fp32, autocast"),
    ({"serve": {"port": 70000}}, "serve.port=70000 must be in [0, 65535]"),
    ({"serve": {"max_choices": 0}}, "serve.max_choices=0 must be >= 1"),
    ({"serve": {"max_body_bytes": 0}}, "serve.max_body_bytes=0 must be >= 1"),
    ({"serve": {"served_model_name": " tiny"}}, "serve.served_model_name=' tiny' must be a non-empty name"),
])
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert field in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(CONFIGS / "tiny.yaml", ["model.mtp_depth"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(CONFIGS / "nope.yaml")


def test_transformer_engine_fp8_runs_only_when_asked_for():
    """The torch FP8 GEMMs are the default whatever is installed; Transformer Engine's path is a switch that
    applies to precision fp8 only and needs the package."""
    from dsmtp.model import DeepSeekV3, fp8
    from tests.helpers import tiny_model_config

    assert load_config(CONFIGS / "tiny.yaml").train.fp8_backend == "torch"
    with pytest.raises(ConfigError, match=r"train\.fp8_backend=transformer_engine applies to train\.precision=fp8"):
        load_config(CONFIGS / "tiny.yaml", ["train.fp8_backend=transformer_engine"])
    with pytest.raises(ConfigError, match=r"train\.fp8_backend='te' must be one of torch, transformer_engine"):
        load_config(CONFIGS / "tiny.yaml", ["train.precision=fp8", "train.fp8_backend=te"])
    model = DeepSeekV3(tiny_model_config())
    assert model.enable_fp8() and all(getattr(m, "fp8", None) != "te" for m in model.modules())
    if not fp8.transformer_engine_available():
        with pytest.raises(ConfigError, match=r"train\.fp8_backend=transformer_engine: Transformer Engine is not installed"):
            DeepSeekV3(tiny_model_config()).enable_fp8("transformer_engine")
