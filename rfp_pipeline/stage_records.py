"""The stage-record IO manager: an asset receives the records of the stages it reads as its inputs.

Every stage asset writes `$RFP_HOME/pipeline/<experiment>/<stage>/result.json` (what it produced,
from what: metadata.write_result; `experiment_config` writes the resolved spec, `experiment.json`)
and returns a MaterializeResult. An upstream asset names its
stage folder in its definition metadata (`STAGE`) and this IO manager (`io_manager_key=STAGE_RECORDS`);
a downstream asset then takes the record as a parameter (`codec_checkpoint: dict`), so the data it
uses is an edge of the asset graph and the UI's lineage, not a file re-read by convention.
A stage that never ran for the partition arrives as a `MissingRecord`, which raises what to
materialise when it is read (a skipped stage, which does not read it, still runs).
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg

from rfp_pipeline.metadata import RESULT_FILE

STAGE_RECORDS = "stage_records"  # the resource key
STAGE = "rfp/stage"  # definition metadata of an upstream asset: its folder under pipeline/<experiment>/ ("." itself)
RECORD = "rfp/record"  # optional definition metadata: the record's file name in that folder (default result.json)


class MissingRecord(dict):
    """The record of a stage that never ran for this partition. Reading it raises what to
    materialise; an asset that does not read it (a skipped stage) still runs."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def __getitem__(self, key: str) -> Any:
        raise FileNotFoundError(self.message)

    def get(self, key: str, default: Any = None) -> Any:
        raise FileNotFoundError(self.message)


class StageRecords(dg.IOManager):
    """Loads the upstream stage's record for the input's partition from the run's RfpHome."""

    def __init__(self, rfp) -> None:
        self.rfp = rfp

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        # Nothing to store: each stage writes its record itself, atomically, inside its body (a
        # retry or a skipped stage must leave a whole record), and returns a MaterializeResult.
        return None

    def load_input(self, context: dg.InputContext) -> dict[str, Any]:
        asset = context.asset_key.to_user_string()
        meta = (context.upstream_output.definition_metadata or {}) if context.upstream_output else {}
        stage = meta.get(STAGE)
        if not stage:
            raise dg.DagsterInvariantViolationError(
                f"'{asset}' uses the '{STAGE_RECORDS}' IO manager but names no stage folder: "
                f"add metadata={{'{STAGE}': '<folder>'}} to its @asset"
            )
        partition = context.asset_partition_key
        path = self.rfp.out_dir(partition, stage) / meta.get(RECORD, RESULT_FILE)
        if not path.exists():
            return MissingRecord(f"{path} is missing: materialise '{asset}' for partition '{partition}' first")
        return json.loads(path.read_text())


@dg.io_manager(
    required_resource_keys={"rfp"},
    description="Stage records (pipeline/<experiment>/<stage>/result.json) as asset inputs",
)
def stage_records(init_context: dg.InitResourceContext) -> StageRecords:
    # the run's own `rfp` resource: a test or launchpad that points RfpHome elsewhere moves the records with it
    return StageRecords(init_context.resources.rfp)
