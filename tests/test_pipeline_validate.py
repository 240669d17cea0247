"""The code location loads: in Python and with `dagster definitions validate -w workspace.yaml`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
from test_pipeline import ROOT, STAGES

from rfp_pipeline.definitions import defs


def test_definitions_load_and_validate_on_the_command_line():
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == set(STAGES)
    # the project's instance config too: an invalid dagster.yaml fails here, not in `dagster dev`
    home = Path(os.environ["RFP_HOME"]) / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Validation successful" in proc.stdout + proc.stderr
