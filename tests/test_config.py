"""RunConfig: the factorization arithmetic, validation messages that name the fix, identity and JSON."""

from __future__ import annotations

import json

import pytest

from ghostsys.run.cli import build_parser, config_from_args
from ghostsys.run.config import ConfigError, RunConfig, field_docs


def test_factorization_arithmetic():
    c = RunConfig(mode="unsynced", norm="ghost", ghost_groups=2, nfp=2, world_size=2, batch_size=64).validate()
    assert (c.micro_batch, c.effective_gm, c.ghost_batch) == (16, 8, 8)
    assert c.factorization == "G_M=8 = n_g 2 x n_fp 2 x G_layer 2"
    s = RunConfig(mode="syncbn", nfp=4, world_size=4, sync_group_size=2, batch_size=64).validate()
    assert s.effective_gm == 8 and s.factorization == "G_M=8 = (n_g 4 / k 2) x n_fp 4 x G_layer 1"
    assert RunConfig(mode="syncbn", world_size=2).validate().effective_gm == 1  # SyncBN over all = BatchNorm


@pytest.mark.parametrize("kw,needle", [
    (dict(batch_size=63, world_size=2), "not divisible by the 2 launched processes"),
    (dict(batch_size=64, world_size=2, nfp=3), "valid --nfp: [1, 2, 4, 8, 16, 32]"),
    (dict(mode="syncbn", world_size=4, sync_group_size=3), "valid: [1, 2, 4]"),
    (dict(world_size=1, nprocs=2), "ACCELERATE_USE_CPU=1"),
    (dict(engine="deepspeed", dtype="float64"), "--dtype float32"),
    (dict(sync_group_size=2), "only applies to --mode syncbn"),
    (dict(world_size=0), "--world-size 0 must be an integer >= 1"),  # no flag: the launcher's WORLD_SIZE
    (dict(lr="0.1"), "--lr '0.1' must be a finite number > 0"),  # the Python API gets types checked too
    (dict(seed=True), "--seed True must be an integer"),
])
def test_bad_combinations_name_the_fix(kw, needle):
    with pytest.raises(ConfigError, match=None) as err:
        RunConfig(**kw).validate()
    assert needle in str(err.value)


def test_identity_ignores_where_and_how_loud():
    a, b = RunConfig(out="x", progress=False, checkpoint_every=5), RunConfig()
    assert a.identity() == b.identity() and a.run_name() == b.run_name()
    assert RunConfig(nfp=2).run_name() != b.run_name()
    resolved = json.loads(json.dumps(RunConfig(nfp=4).resolved()))
    assert RunConfig.from_dict(resolved).identity() == RunConfig(nfp=4).identity()  # config.json maps back
    assert RunConfig(norm="batch").run_name() == RunConfig().run_name()  # the mode's default norm, named


def test_every_flag_has_help_and_maps_back():
    docs = field_docs()
    assert {"batch_size", "nfp", "ghost_groups", "buffer_sync"} <= set(docs) and all(docs.values())
    cfg, _ = config_from_args(build_parser("t", "t"), ["--nfp", "4", "--no-progress", "--local_rank=1"])
    assert cfg.nfp == 4 and cfg.progress is False
