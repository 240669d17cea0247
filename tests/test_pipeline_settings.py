"""Pipeline settings are resources: an unset field reads its environment variable when a run uses it,
not when the code location is imported (so a variable set later, in a shell or a test, applies)."""

from __future__ import annotations

import os

import dagster as dg
from test_pipeline import TINY_OVERRIDES, make_project, register_partitions, resources_for

from rfp_pipeline.assets import assets
from rfp_pipeline.definitions import default_resources, defs
from rfp_pipeline.resources import THRESHOLD_ENV, CheckThresholds, ManifestDuckDB


def test_check_limits_read_the_environment_when_used_and_a_set_field_wins(monkeypatch):
    for var, _ in THRESHOLD_ENV.values():
        monkeypatch.delenv(var, raising=False)
    unset = CheckThresholds()
    assert {name: unset.value(name) for name in THRESHOLD_ENV} == {n: d for n, (_, d) in THRESHOLD_ENV.items()}
    monkeypatch.setenv("RFP_MIN_MASK_IOU", "0.5")
    monkeypatch.setenv("RFP_MIN_FRAMES_PER_DOMAIN", "7")
    assert unset.value("min_mask_iou") == 0.5  # the same resource, the variable set after it was made
    assert unset.value("min_frames_per_domain") == 7 and isinstance(unset.value("min_frames_per_domain"), int)
    assert CheckThresholds(min_mask_iou=0.25).value("min_mask_iou") == 0.25


def test_duckdb_database_comes_from_the_environment_at_query_time(tmp_path, monkeypatch):
    monkeypatch.delenv("RFP_DUCKDB", raising=False)
    db = ManifestDuckDB()
    with db.get_connection() as con:
        assert con.execute("select current_database()").fetchone() == ("memory",)
    path = tmp_path / "views.duckdb"
    monkeypatch.setenv("RFP_DUCKDB", str(path))
    with db.get_connection() as con:
        con.execute("create view seven as select 7 as n")
    with db.get_connection() as con:  # the file keeps the view between connections
        assert con.execute("select n from seven").fetchone() == (7,)
    assert path.is_file()


def test_a_limit_set_after_import_applies_to_the_next_materialisation(tmp_path, isolated_rfp_home, monkeypatch):
    assert defs is not None  # the code location is loaded before the variable is set
    root = make_project(tmp_path / "project", {"few": TINY_OVERRIDES}, n=3)
    resources = {**resources_for(root, isolated_rfp_home, os.environ["MLFLOW_TRACKING_URI"])}
    resources["thresholds"] = default_resources()["thresholds"]
    monkeypatch.setenv("RFP_MIN_FRAMES_PER_DOMAIN", "4")  # the experiment has 3 frames a domain
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        register_partitions(instance, resources)
        result = dg.materialize(
            assets,
            selection=["experiment_config", "media_manifest"],
            instance=instance,
            resources=resources,
            partition_key="few",
            raise_on_error=False,
        )
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["usable_frames"].passed
    assert checks["usable_frames"].metadata["min_frames_per_domain"].value == 4
