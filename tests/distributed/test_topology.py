"""Layout validation (dsmtp.config.validate with the world size): every impossible layout fails before any
process group exists, with a message naming the field. Pure functions: no processes are started."""

from __future__ import annotations

import pytest

from dsmtp.config import ConfigError, validate
from dsmtp.parallel.pipeline import stage_layers
from tests.distributed.common import tiny_config


def test_valid_layouts_give_the_data_parallel_size():
    assert validate(tiny_config(), 1) == 1
    assert validate(tiny_config(tp=2, pp=2), 8) == 2
    assert validate(tiny_config(pp=2, ep=2), 4) == 2
    assert validate(tiny_config(tp=2, ep=2, sp=True), 4) == 2


@pytest.mark.parametrize("cfg, world, names", [
    (dict(tp=2, pp=2), 6, ["world size 6", "parallel.tp=2", "parallel.pp=2"]),
    (dict(ep=4), 2, ["parallel.ep=4", "data-parallel size 2"]),  # EP carved out of DP
    (dict(ep=2, zero=3), 2, ["parallel.zero_stage=3"]),
    (dict(), 3, ["train.micro_batch_size=4", "data-parallel size 3"]),
    (dict(tp=2, pp=2, sp=True), 4, ["parallel.sequence_parallel", "parallel.pp=2"]),
])
def test_invalid_layouts_are_refused(cfg, world, names):
    with pytest.raises(ConfigError) as err:
        validate(tiny_config(**cfg), world)
    for name in names:
        assert name in str(err.value)


def test_sequence_parallel_needs_a_sequence_divisible_by_tp():
    cfg = tiny_config(tp=2, sp=True)
    cfg.train.seq_len = 15
    with pytest.raises(ConfigError, match=r"train\.seq_len=15 over parallel\.tp=2"):
        validate(cfg, 2)


@pytest.mark.parametrize("override, field", [
    ("parallel.tp=3", "model.num_heads"),
    ("parallel.ep=3", "model.n_routed_experts"),
    ("parallel.pp=4", "parallel.pp=4"),
    ("parallel.zero_stage=2", "parallel.zero_stage=2"),  # with pp=2 below
])
def test_config_refuses_layouts_that_do_not_fit_the_model(override, field):
    from dsmtp.config import load_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, ["model.num_layers=3", "model.num_heads=2", "parallel.pp=2", override])


def test_stages_cover_every_layer_once_and_the_last_stage_is_lightest():
    for layers in range(1, 9):
        for pp in range(1, layers + 1):
            stages = [stage_layers(layers, pp, s) for s in range(pp)]
            assert [i for st in stages for i in st] == list(range(layers))
            assert all(len(st) >= 1 for st in stages)
            assert len(stages[-1]) == min(len(st) for st in stages)
