"""Stage records arrive as asset inputs: the graph's edges carry them, the IO manager loads the
record of the input's own partition, and the checks the consumers made on re-read files still
apply to the record they are handed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
from stages import STAGES
from test_pipeline import RUN_CONFIG, make_project, register_partitions, resources_for
from test_pipeline_structure import PAIRED, TINY_VAE

from rfp_core.config_files import config_from_dict
from rfp_core.media.manifest import content_version
from rfp_pipeline.assets import assets
from rfp_pipeline.assets.structure import current_pairs
from rfp_pipeline.assets.training import current_codec
from rfp_pipeline.definitions import default_resources
from rfp_pipeline.metadata import RESULT_FILE, write_result
from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.resources import RfpHome
from rfp_pipeline.stage_records import STAGE, STAGE_RECORDS, stage_records

STAGES_AFTER_INGEST = STAGES[STAGES.index("frame_store") :]
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
# consumer -> the stage records it reads (each one an input, not a dependency plus a file read)
# (the spec and the frames too: experiment_config's experiment.json, frame_store's record naming the manifest)
SPEC, FRAMES = {"experiment_config"}, {"experiment_config", "frame_store"}
READS = {
    "media_manifest": SPEC,
    "frame_store": SPEC | {"media_manifest"},
    "structure_embeddings": FRAMES,
    "structure_pairs": FRAMES | {"structure_embeddings"},
    "codec_checkpoint": FRAMES,
    "saliency_checkpoint": FRAMES | {"codec_checkpoint"},
    "velocity_checkpoint": FRAMES | {"codec_checkpoint", "saliency_checkpoint", "structure_pairs"},
    "evaluation_samples": FRAMES | {"velocity_checkpoint"},
    "translated_media": SPEC | {"velocity_checkpoint"},
    "reflow_couplings": FRAMES | {"velocity_checkpoint"},
    "reflow_checkpoint": FRAMES | {"velocity_checkpoint", "saliency_checkpoint"},
    "distilled_checkpoint": FRAMES | {"velocity_checkpoint", "saliency_checkpoint"},
}


def test_every_stage_record_read_is_a_data_input_of_the_graph():
    by_key = {a.key.to_user_string(): a for a in assets}
    for consumer, upstreams in READS.items():
        node = by_key[consumer].node_def
        loaded = {i.name for i in node.input_defs if not i.dagster_type.is_nothing}
        assert loaded == upstreams, consumer
    for upstream in set().union(*READS.values()):
        spec = next(iter(by_key[upstream].specs))
        assert by_key[upstream].get_io_manager_key_for_asset_key(spec.key) == STAGE_RECORDS, upstream
        assert spec.metadata[STAGE], upstream
    # nothing read behind a plain dependency: those left only order (the translation waits for the
    # evaluation; k-RF finds the couplings by their content address, the distillation the k-RF flows)
    order_only = {
        "translated_media": {"evaluation_samples"},
        "reflow_checkpoint": {"reflow_couplings"},
        "distilled_checkpoint": {"reflow_checkpoint"},
    }
    for consumer in READS:
        node = by_key[consumer].node_def
        plain = {i.name for i in node.input_defs if i.dagster_type.is_nothing}
        assert plain == order_only.get(consumer, set()), consumer
    # the UI's lineage: the record edges are graph edges (and definitions.py resolves them)
    graph = dg.Definitions(assets=assets, resources=default_resources()).resolve_asset_graph()
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("translated_media")).parent_keys}
    assert parents == {"velocity_checkpoint", "evaluation_samples", "experiment_config"}


@dg.asset(partitions_def=experiments_partitions)
def probe(velocity_checkpoint: dict) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"key": velocity_checkpoint["key"]})


@dg.asset(partitions_def=experiments_partitions)
def skipped_probe(velocity_checkpoint: dict) -> dg.MaterializeResult:
    """Like a skipped stage: handed the record, never reads it."""
    return dg.MaterializeResult(metadata={"skipped": True})


def _probe(tmp_path: Path, partition: str, rfp: RfpHome, selection=(probe,)) -> dg.ExecuteInProcessResult:
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        instance.add_dynamic_partitions("experiments", ["a", "b", "c"])
        return dg.materialize(
            [*assets, probe, skipped_probe],
            selection=list(selection),
            partition_key=partition,
            instance=instance,
            resources={**default_resources(), "rfp": rfp},
            raise_on_error=False,
        )


def test_the_input_is_the_record_of_its_own_partition_under_the_runs_home(tmp_path):
    rfp = RfpHome(home=str(tmp_path / "home"), project_root=str(tmp_path), device="cpu")
    for name in ("a", "b"):
        write_result(rfp.out_dir(name, "velocity"), {"checkpoint": f"/{name}.pt", "key": f"key-{name}"})
    result = _probe(tmp_path, "b", rfp)
    assert result.success
    assert result.asset_materializations_for_node("probe")[0].metadata["key"].value == "key-b"


def test_a_missing_record_says_which_asset_to_materialise_when_it_is_read(tmp_path):
    rfp = RfpHome(home=str(tmp_path / "home"), project_root=str(tmp_path), device="cpu")
    result = _probe(tmp_path, "c", rfp, selection=(skipped_probe, probe))
    # a stage that does not read it runs (as a skipped stage did when it re-read files itself)
    assert [m.asset_key.to_user_string() for m in result.get_asset_materialization_events()] == ["skipped_probe"]
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    text = "\n".join(messages)
    assert "materialise 'velocity_checkpoint' for partition 'c' first" in text, text
    assert str(rfp.out_dir("c", "velocity") / "result.json") in text


@dg.asset(partitions_def=experiments_partitions, io_manager_key=STAGE_RECORDS)
def unnamed_stage() -> dg.MaterializeResult:
    return dg.MaterializeResult()


@dg.asset(partitions_def=experiments_partitions)
def reads_unnamed(unnamed_stage: dict) -> None:
    pass


def test_an_upstream_without_a_stage_folder_is_named_in_the_error(tmp_path):
    rfp = RfpHome(home=str(tmp_path / "home"), project_root=str(tmp_path), device="cpu")
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        instance.add_dynamic_partitions("experiments", ["a"])
        result = dg.materialize(
            [unnamed_stage, reads_unnamed],
            selection=[reads_unnamed],
            partition_key="a",
            instance=instance,
            resources={"rfp": rfp, STAGE_RECORDS: stage_records},
            raise_on_error=False,
        )
    error = result.get_step_failure_events()[0].step_failure_data.error
    text = error.message + (error.cause.message if error.cause else "")
    assert f"'unnamed_stage' uses the '{STAGE_RECORDS}' IO manager but names no stage folder" in text, text


def _cfg(**overrides):
    return config_from_dict(json.loads(TINY.read_text()), overrides=overrides)


def test_a_codec_record_built_for_another_codec_config_is_refused():
    cfg = _cfg(codec={"net": TINY_VAE})
    rec = {"skipped": False, "key": "k", "checkpoint": "/c.pt", "codec_config": cfg.codec.model_dump(mode="json")}
    assert current_codec(rec, "x", cfg) is rec
    other = _cfg(codec={"net": {**TINY_VAE, "latent_channels": 8}})
    refused = "built for another codec config.*materialise 'codec_checkpoint' for partition 'x'"
    with pytest.raises(FileNotFoundError, match=refused):
        current_codec(rec, "x", other)
    assert current_codec({"skipped": True}, "x", _cfg()) is None  # Identity: pixel space, no codec


def test_pairs_recorded_with_pairing_off_are_refused_when_pairing_is_on():
    paired = _cfg(structure=PAIRED["structure"])
    with pytest.raises(FileNotFoundError, match="structure_pairs last ran with it off"):
        current_pairs({"skipped": True}, "x", paired)
    rec = {"skipped": False, "pairs": "/p.parquet", "version": "v"}
    assert current_pairs(rec, "x", paired) is rec
    assert current_pairs(rec, "x", _cfg()) is None  # pairing off: the velocity draws partners at random


def test_the_stages_use_the_manifest_their_inputs_name_not_the_conventional_path(tmp_path, isolated_rfp_home):
    """The manifest moved away from pipeline/<exp>/manifest.parquet, media_manifest's record pointing
    at its new place: every stage after it still runs, on the moved file (a stage that looked for the
    manifest by convention would fail with FileNotFoundError)."""
    root = make_project(tmp_path / "project", {"moved": PAIRED}, n=8)
    resources = resources_for(root, isolated_rfp_home, os.environ["MLFLOW_TRACKING_URI"])
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        register_partitions(instance, resources)
        kw = dict(instance=instance, resources=resources, partition_key="moved")
        assert dg.materialize(assets, selection=["experiment_config", "media_manifest"], **kw).success
        home = resources["rfp"].out_dir("moved")
        (tmp_path / "elsewhere").mkdir()
        moved = shutil.move(home / "manifest.parquet", tmp_path / "elsewhere" / "m.parquet")
        write_result(home, {**json.loads((home / RESULT_FILE).read_text()), "manifest": str(moved)})
        result = dg.materialize(assets, selection=STAGES_AFTER_INGEST, run_config=RUN_CONFIG, **kw)
    assert result.success
    assert not (home / "manifest.parquet").exists()
    assert json.loads((home / "frame_store" / RESULT_FILE).read_text())["manifest"] == str(moved)
    md = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert md["structure_pairs"]["frames_domain0"].value == 8  # the pairs read the moved manifest's frames
    for stage in ("saliency_checkpoint", "velocity_checkpoint"):
        assert md[stage]["built_from_manifest"].value == content_version(Path(moved)), stage
    assert md["evaluation_samples"]["n_eval"].value > 0  # held-out frames of the moved manifest
