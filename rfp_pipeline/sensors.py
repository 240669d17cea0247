"""Sensors: experiment files -> partitions; changed domain folders -> media_manifest runs.

Both compare content digests with what the last materialisation recorded, so a restart (or a
reset cursor) never re-requests unchanged work; the cursor (JSON) remembers what was already
requested, so a queued run is not requested again on the next tick.
"""

import json

import dagster as dg

from rfp_core import experiments as exps
from rfp_core.config import ConfigError
from rfp_pipeline.assets.ingest import experiment_config, media_manifest
from rfp_pipeline.partitions import EXPERIMENTS, experiments_partitions
from rfp_pipeline.resources import RfpHome

SENSOR_INTERVAL_S = 30
SENSOR_HASH_CACHE = "sensor_hash_cache.parquet"  # its own file: ingest saving its cache must not race ours


def _cursor(context: dg.SensorEvaluationContext) -> dict[str, str]:
    try:
        value = json.loads(context.cursor or "{}")
        return value if isinstance(value, dict) else {}
    except json.JSONDecodeError:
        return {}


def _latest_data_version(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str) -> str | None:
    record = instance.get_latest_data_version_record(key, partition_key=partition)
    if record is None or record.asset_materialization is None:
        return None
    return record.asset_materialization.tags.get("dagster/data_version")


def _latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str, entry: str) -> str | None:
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    )
    if not result.records:
        return None
    value = result.records[0].asset_materialization.metadata.get(entry)
    return None if value is None else str(value.value)


@dg.sensor(
    name="experiments_sensor",
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[experiment_config],
    description="Adds a partition when experiments/<name>.json appears, removes it when the file goes, "
    "and re-materialises experiment_config when the file (or the config file it names) changes content.",
)
def experiments_sensor(context: dg.SensorEvaluationContext, rfp: RfpHome) -> dg.SensorResult:
    root = rfp.root_path()
    files = rfp.experiment_files()
    existing = set(context.instance.get_dynamic_partitions(EXPERIMENTS))
    seen = _cursor(context)
    cursor: dict[str, str] = {}
    added, runs = [], []
    for name, path in files.items():
        try:
            digest = exps.spec_digest(exps.resolved_spec(exps.load(path, root), root))
        except (ConfigError, ValueError, OSError) as exc:
            context.log.warning(f"experiment file skipped until fixed: {exc}")
            if name in seen:
                cursor[name] = seen[name]
            continue
        cursor[name] = digest
        if name not in existing:
            added.append(name)
        elif seen.get(name) == digest or _latest_data_version(context.instance, experiment_config.key, name) == digest:
            continue
        runs.append(dg.RunRequest(partition_key=name, asset_selection=[experiment_config.key]))
    removed = sorted(existing - set(files))
    requests: list = []
    if added:
        requests.append(experiments_partitions.build_add_request(added))
    if removed:
        requests.append(dg.DeleteDynamicPartitionsRequest(EXPERIMENTS, removed))
    if added or removed or runs:
        context.log.info(
            f"experiments: added {added}, removed {removed}, changed "
            f"{[r.partition_key for r in runs if r.partition_key not in added]}"
        )
    return dg.SensorResult(
        run_requests=runs, dynamic_partitions_requests=requests, cursor=json.dumps(cursor, sort_keys=True)
    )


@dg.sensor(
    name="domain_folders_sensor",
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[media_manifest],
    description="Stat-scans each experiment's domain folders; re-hashes only files whose size/mtime/inode "
    "changed, and requests media_manifest for exactly the experiments whose folder *content* changed.",
)
def domain_folders_sensor(context: dg.SensorEvaluationContext, rfp: RfpHome) -> dg.SensorResult:
    root = rfp.root_path()
    partitions = set(context.instance.get_dynamic_partitions(EXPERIMENTS))
    files = rfp.experiment_files()
    cache = rfp.hash_cache(SENSOR_HASH_CACHE)
    seen = _cursor(context)
    cursor: dict[str, str] = {}
    runs = []
    for name in sorted(partitions & set(files)):
        try:
            exp = exps.load(files[name], root)
            digest = exps.folder_digest(exp.domain0, exp.domain1, cache)
        except (ConfigError, ValueError, OSError) as exc:
            context.log.warning(f"{name}: folders not scanned: {exc}")
            continue
        cursor[name] = digest
        if seen.get(name) == digest:
            continue  # nothing new since the last look (or already requested)
        built = _latest_metadata(context.instance, media_manifest.key, name, "folder_digest")
        # never built: a new experiment's manifest follows experiment_config (eager automation)
        if built is not None and built != digest:
            runs.append(dg.RunRequest(partition_key=name, asset_selection=[media_manifest.key]))
    cache.save()
    return dg.SensorResult(run_requests=runs, cursor=json.dumps(cursor, sort_keys=True))


automation_sensor = dg.AutomationConditionSensorDefinition(
    "rfp_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    description="Evaluates every asset's automation condition: eager for ingest and evaluation, "
    "the retraining cron for training. Stop it here to run everything by hand.",
)

sensors = [experiments_sensor, domain_folders_sensor, automation_sensor]
