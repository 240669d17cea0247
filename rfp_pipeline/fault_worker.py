"""One Dagster run of an experiment's training stages, for `rfp bench faults`.

`python -m rfp_pipeline.fault_worker --experiment NAME --project ROOT` materialises the assets up to
`velocity_checkpoint` for partition NAME on the instance in $DAGSTER_HOME, with state in $RFP_HOME.
The run executes in this process (Dagster's in-process executor), so this process *is* the run
worker: the campaign SIGKILLs it at random moments, and the next launch -- a new run of the same
assets -- resumes every training stage from its stage folder
(`$RFP_HOME/pipeline/<exp>/<stage>/<key>/`, the key a digest of the stage's inputs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STAGES = [
    "experiment_config",
    "media_manifest",
    "frame_store",
    "structure_embeddings",
    "structure_pairs",
    "codec_checkpoint",
    "saliency_checkpoint",
    "velocity_checkpoint",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--project", required=True, help="project root holding experiments/<name>.json")
    args = parser.parse_args(argv)

    import dagster as dg

    from rfp_pipeline.assets import assets
    from rfp_pipeline.definitions import default_resources
    from rfp_pipeline.partitions import EXPERIMENTS
    from rfp_pipeline.resources import CheckThresholds, MlflowTracking, RfpHome

    home = Path(os.environ["RFP_HOME"])
    root = Path(args.project)
    resources = default_resources()
    resources["rfp"] = RfpHome(
        home=str(home), project_root=str(root), experiments_dir=str(root / "experiments"), device="cpu"
    )
    resources["mlflow_tracking"] = MlflowTracking(
        tracking_uri=f"sqlite:///{home}/mlflow.db", artifact_root=str(home / "mlartifacts")
    )
    # the campaign checks resume, not translation quality: no quality gate on these tiny nets
    resources["thresholds"] = CheckThresholds(min_transfer_rate=0.0, min_mask_iou=0.0)
    instance = dg.DagsterInstance.get()
    if not instance.has_dynamic_partition(EXPERIMENTS, args.experiment):
        instance.add_dynamic_partitions(EXPERIMENTS, [args.experiment])
    result = dg.materialize(
        assets,
        instance=instance,
        resources=resources,
        partition_key=args.experiment,
        selection=STAGES,
        raise_on_error=False,
    )
    if not result.success:
        print(f"fault worker: the run of {args.experiment} failed (run id {result.run_id})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
