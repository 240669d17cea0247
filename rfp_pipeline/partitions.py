"""One partition per experiment file: `experiments/<name>.json` is partition `<name>`."""

from __future__ import annotations

import dagster as dg

EXPERIMENTS = "experiments"

# Coarse on purpose (experiments, not frames): Dagster advises at most ~25,000 partitions per asset.
experiments_partitions = dg.DynamicPartitionsDefinition(name=EXPERIMENTS)
