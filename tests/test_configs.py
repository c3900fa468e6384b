"""Every shipped cluster config loads, and typos are errors (not silently ignored)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lmdisagg.config import ClusterConfig
from lmdisagg.errors import InvalidRequestError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "cluster_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = ClusterConfig.from_yaml(path)
    assert cfg.model and cfg.router.port == 8000


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2-135m\nengine:\n  chunk_tokns: 256\n")
    with pytest.raises(InvalidRequestError, match="chunk_tokns"):
        ClusterConfig.from_yaml(bad)
    bad.write_text("router:\n  policy: random_forest\n")
    with pytest.raises(InvalidRequestError, match="unknown placement policy"):
        ClusterConfig.from_yaml(bad)
    bad.write_text("mode: disaggregated\nprefill:\n  replicas: 0\n")
    with pytest.raises(InvalidRequestError, match="at least one prefill"):
        ClusterConfig.from_yaml(bad)
    with pytest.raises(InvalidRequestError, match="cannot read"):
        ClusterConfig.from_yaml(tmp_path / "missing.yaml")
