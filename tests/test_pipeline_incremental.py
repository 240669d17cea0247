"""Incremental behaviour: data versions from content, staleness, the folder sensor, the retraining cron."""

from __future__ import annotations

import datetime
import os
import time

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver  # the UI's staleness, for tests
from media_factory import make_image
from test_pipeline import (
    TINY_OVERRIDES,
    data_version,
    make_project,
    materialize_all,
    register_partitions,
    resources_for,
    tick,
)

from rfp_pipeline.assets import assets
from rfp_pipeline.definitions import defs
from rfp_pipeline.sensors import domain_folders_sensor

INGEST = ["experiment_config", "media_manifest"]
TRAINING = [dg.AssetKey("saliency_checkpoint"), dg.AssetKey("velocity_checkpoint")]
FOLLOWERS = [dg.AssetKey("frame_store"), dg.AssetKey("evaluation_samples")]


@pytest.fixture
def project(tmp_path, isolated_rfp_home):
    root = make_project(tmp_path / "project", {"inc": TINY_OVERRIDES, "other": TINY_OVERRIDES}, n=10)
    resources = resources_for(root, isolated_rfp_home, os.environ["MLFLOW_TRACKING_URI"])
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        register_partitions(instance, resources)
        yield root, resources, instance


def stale(instance, key: str, partition: str) -> StaleStatus:
    return get_stale_status_resolver(instance, assets).get_status(dg.AssetKey(key), partition)


def folder_tick(instance, resources, cursor):
    return tick(domain_folders_sensor, instance, resources, cursor)


def training_requests(instance, cursor, when, keys=TRAINING):
    """What the automation sensor would request at `when` (partitions by asset, among `keys`)."""
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=when, cursor=cursor)
    return {
        k.to_user_string(): sorted(result.get_requested_partitions(k))
        for k in keys
        if result.get_requested_partitions(k)
    }, result.cursor


def test_touch_keeps_versions_fresh_and_adding_an_image_makes_training_stale(project):
    root, resources, instance = project
    assert materialize_all(instance, resources, "inc").success
    assert dg.materialize(
        assets, instance=instance, resources=resources, partition_key="other", selection=INGEST
    ).success
    v1 = data_version(instance, "media_manifest", "inc")
    now = datetime.datetime.now(datetime.timezone.utc)
    requested, auto = training_requests(instance, None, now)  # first evaluation: the baseline
    assert requested == {}
    first = folder_tick(instance, resources, None)
    assert first.run_requests == []  # folders match what was built

    # touch a domain file: new mtime, same bytes
    victim = root / "data" / "inc" / "domain0" / "a03.png"
    later = time.time() + 5
    os.utime(victim, (later, later))
    touched = folder_tick(instance, resources, first.cursor)
    assert touched.run_requests == []
    assert dg.materialize(
        assets, instance=instance, resources=resources, partition_key="inc", selection=["media_manifest", "frame_store"]
    ).success
    assert data_version(instance, "media_manifest", "inc") == v1
    for key in ("frame_store", "saliency_checkpoint", "velocity_checkpoint", "evaluation_samples"):
        assert stale(instance, key, "inc") == StaleStatus.FRESH, key
    requested, auto = training_requests(instance, auto, now + datetime.timedelta(minutes=1))
    assert requested == {}
    requested, auto = training_requests(instance, auto, now + datetime.timedelta(days=8))  # a cron tick passed
    assert requested == {}  # nothing changed: no retraining

    # add an image to one experiment: the sensor requests exactly that experiment
    make_image(root / "data" / "inc" / "domain1" / "new.png", 16, (20, 90, 230))
    added = folder_tick(instance, resources, touched.cursor)
    assert [(r.partition_key, r.asset_selection) for r in added.run_requests] == [
        ("inc", [dg.AssetKey("media_manifest")])
    ]
    assert folder_tick(instance, resources, added.cursor).run_requests == []  # requested once, not every tick
    assert dg.materialize(
        assets, instance=instance, resources=resources, partition_key="inc", selection=["media_manifest"]
    ).success
    assert data_version(instance, "media_manifest", "inc") != v1
    assert stale(instance, "frame_store", "inc") == StaleStatus.STALE
    # the frame store follows eagerly; the evaluation waits for a new velocity, not every re-ingest
    requested, auto = training_requests(
        instance, auto, now + datetime.timedelta(days=8, seconds=30), TRAINING + FOLLOWERS
    )
    assert requested == {"frame_store": ["inc"]}
    assert dg.materialize(
        assets, instance=instance, resources=resources, partition_key="inc", selection=["frame_store"]
    ).success
    for key in ("saliency_checkpoint", "velocity_checkpoint"):
        assert stale(instance, key, "inc") == StaleStatus.STALE, key
    # training waits for the retraining cron, then runs for the changed experiment only
    requested, auto = training_requests(instance, auto, now + datetime.timedelta(days=8, minutes=1))
    assert requested == {}
    requested, auto = training_requests(instance, auto, now + datetime.timedelta(days=16))
    assert requested == {"saliency_checkpoint": ["inc"], "velocity_checkpoint": ["inc"]}
