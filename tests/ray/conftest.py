"""One real Ray cluster of two nodes on this machine for every Ray test, and moto's S3 as the shared storage."""

from __future__ import annotations

import pytest

from tests.trainer.trainer_helpers import trainer_env


@pytest.fixture(scope="session")
def ray_cluster():
    """A head and one worker node, one CPU each (so a 2-node CPU job takes both), the dashboard off."""
    from tests.ray.cluster import RayCluster

    cluster = RayCluster(trainer_env())
    try:
        cluster.add_node()
        yield cluster
    finally:
        cluster.stop()
