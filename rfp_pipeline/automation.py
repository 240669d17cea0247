"""Declarative automation: cheap stages follow their inputs, training follows a retraining cron.

Both conditions are shown per asset in the UI (Automation tab) and run by the
`rfp_automation` sensor, which can be switched off there like any sensor.
"""

from __future__ import annotations

import os

import dagster as dg

DEFAULT_RETRAIN_CRON = "0 3 * * 0"  # Sundays 03:00

AC = dg.AutomationCondition


def retrain_cron() -> str:
    """`RFP_RETRAIN_CRON` (read when the code location loads), default weekly."""
    return os.environ.get("RFP_RETRAIN_CRON", "").strip() or DEFAULT_RETRAIN_CRON


def retrain_timezone() -> str:
    return os.environ.get("RFP_RETRAIN_TIMEZONE", "").strip() or "UTC"


# Cheap stages (manifest, frame store, evaluation samples) re-run whenever an input re-materialises.
cheap = AC.eager


def follows(*ignored: str) -> dg.AutomationCondition:
    """Eager, but updates of `ignored` inputs do not trigger a run (they are read, not followed):
    the evaluation follows a new velocity, not every re-ingest before the next retraining."""
    return (
        AC.eager()
        .replace("any_deps_updated", AC.any_deps_updated().ignore(dg.AssetSelection.assets(*ignored)))
        .with_label(f"eager (ignoring {', '.join(ignored)})")
    )


def on_retrain_cron(cron: str | None = None, timezone: str | None = None) -> dg.AutomationCondition:
    """Run at a cron tick, but only if an input's *data version* changed since this asset last ran.

    Unlike `AutomationCondition.on_cron` (which needs every input re-materialised after the
    tick), an input that changed on Tuesday is picked up at Sunday's tick; a re-run that produced
    the same data version (a touched file) counts as no change. Updates made by the same run that
    also builds this asset do not count, so saliency + velocity retraining together does not
    schedule velocity again for the week after.
    """
    cron = cron or retrain_cron()
    timezone = timezone or retrain_timezone()
    input_changed = AC.any_deps_match(
        (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("data_version_changed")
    ).with_label("input data version changed")
    changed = (input_changed | AC.code_version_changed()).since_last_handled()
    due = (AC.cron_tick_passed(cron, timezone) & changed).since_last_handled()
    return (due & ~AC.any_deps_missing() & ~AC.any_deps_in_progress() & ~AC.in_progress()).with_label(
        f"retrain on cron({cron}, {timezone}) if inputs changed"
    )
