"""The UIs, looked at (issue 14, item 6): a tiny demo state, `dagster-webserver` and `mlflow ui` on
loopback ports that are not their defaults, headless Chromium. Each page is checked for what a
user should find on it (asset names, the grid image loaded, metric names, a working MLflow link,
the runs view, check results naming their partition), and photographed.

`make test-ui` installs Chromium + chromedriver (Debian packages) and Selenium, runs this test and
keeps the screenshots in docs/ui/ ($RFP_SCREENSHOTS_DIR); without them the test is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import ui_servers as U
from stages import STAGES

from rfp_core import tracking

EXPECTED = STAGES[: STAGES.index("translated_media") + 1]  # the graph before the reflow stages
GROUPS = ("ingest", "structure", "training", "evaluation")

MATERIALIZATION = """query($key: [String!]!, $p: String!) {
  assetNodeOrError(assetKey: {path: $key}) { ... on AssetNode {
  assetMaterializations(partitions: [$p], limit: 1) { partition metadataEntries { label
    ... on MarkdownMetadataEntry { mdStr } ... on UrlMetadataEntry { url } } }
  assetChecksOrError { ... on AssetChecks { checks { name executionForLatestMaterialization { status
    evaluation { partition description } } } } } } } }"""


def _missing_tools() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    for tool in (U.CHROMIUM, U.CHROMEDRIVER):
        if not Path(tool).exists():
            return f"{tool} is missing"
    return None


def _wait_for(driver, predicate, seconds: float = 60, what: str = "page content"):
    deadline = time.monotonic() + seconds
    from selenium.common.exceptions import StaleElementReferenceException

    while time.monotonic() < deadline:
        try:
            found = predicate()
        except StaleElementReferenceException:  # the app re-rendered under the query
            found = None
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"{what} did not appear within {seconds} s on {driver.current_url}")


def _skip_dagster_welcome(driver) -> None:
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
        button.click()
        time.sleep(0.5)


def _label_matches(name: str, labels: set[str]) -> bool:
    """Dagster shortens long node labels to `start…end`."""
    for label in labels:
        if label == name or (
            "…" in label and name.startswith(label.split("…")[0]) and name.endswith(label.split("…")[-1])
        ):
            return True
    return False


def _node(port: int, asset: str) -> dict:
    return U.graphql(port, MATERIALIZATION, {"key": [asset], "p": U.NAME})["assetNodeOrError"]


@pytest.mark.slow
def test_dagster_and_mlflow_uis_show_the_demo_state(tmp_path):
    missing = _missing_tools()
    if missing:
        pytest.skip(f"{missing}: run `make test-ui` (installs chromium, chromium-driver and selenium)")
    from selenium.webdriver.common.by import By

    dport, mport = U.free_port(), U.free_port()
    assert {dport, mport}.isdisjoint({3000, 5000})
    env = U.environment(tmp_path, mport)
    saved = dict(os.environ)
    try:
        result = U.build_state(tmp_path, env)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert result.success
    shots = Path(os.environ.get("RFP_SCREENSHOTS_DIR") or tmp_path / "screens")
    dagster, mlflow_ui = f"http://127.0.0.1:{dport}", f"http://127.0.0.1:{mport}"

    with U.serve(tmp_path, env, dport, mport):
        # -- content, from the webserver's GraphQL API (what the pages are drawn from)
        served = {
            "/".join(n["assetKey"]["path"])
            for n in U.graphql(dport, "{ assetNodes { assetKey { path } } }")["assetNodes"]
        }
        assert set(EXPECTED) <= served
        evaluation = _node(dport, "evaluation_samples")
        entries = {e["label"]: e for e in evaluation["assetMaterializations"][0]["metadataEntries"]}
        assert evaluation["assetMaterializations"][0]["partition"] == U.NAME
        assert (
            "data:image/png;base64," in entries["grid"]["mdStr"]
            and "data:image/png;base64," in entries["cycle_grid"]["mdStr"]
        )
        run_link, runs_link = entries["mlflow_run"]["url"], entries["mlflow_runs"]["url"]
        assert run_link.startswith(f"{mlflow_ui}/#/experiments/")  # the UI's real port, not 5000
        checks = evaluation["assetChecksOrError"]["checks"]
        for asset in ("media_manifest", "saliency_checkpoint", "velocity_checkpoint"):
            checks += _node(dport, asset)["assetChecksOrError"]["checks"]
        assert len(checks) == 6
        for c in checks:
            ev = c["executionForLatestMaterialization"]["evaluation"]
            assert ev["partition"] == U.NAME and ev["description"].startswith(f"partition '{U.NAME}'"), c
        exp_id = re.search(r"#/experiments/(\d+)", run_link).group(1)
        search = urllib.request.Request(
            f"{mlflow_ui}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [exp_id]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(search, timeout=30) as resp:
            runs = json.loads(resp.read())["runs"]
        assert re.search(r"/runs/(\w+)", run_link).group(1) in {r["info"]["run_id"] for r in runs}
        if tracking.system_metrics_available():  # sampled while training ran (psutil installed)
            velocity = next(r for r in runs if r["info"]["run_name"] == f"velocity {U.NAME}")
            assert "system/cpu_utilization_percentage" in {m["key"] for m in velocity["data"]["metrics"]}

        driver = U.browser(1400, 900)
        try:
            # -- the asset graph, every group open, the partition materialised
            driver.get(f"{dagster}/server_info")
            driver.execute_script(
                "localStorage.setItem(arguments[0], arguments[1])",
                "asset-graph-open-graph-nodes-global-__GLOBAL__",
                json.dumps({"expanded": ",".join(f"global@global:{g}" for g in GROUPS)}),
            )
            driver.get(f"{dagster}/asset-groups")
            labels = lambda: set(  # noqa: E731 - the text of every leaf element, after the JS ran
                driver.execute_script(
                    "return Array.from(document.querySelectorAll('*')).filter(e => !e.children.length)"
                    ".map(e => e.textContent.trim()).filter(Boolean)"
                )
            )
            _wait_for(driver, lambda: _label_matches("translated_media", labels()), what="the asset graph")
            _skip_dagster_welcome(driver)
            time.sleep(5)  # the nodes' materialisation status arrives after their labels
            shown = labels()
            assert [a for a in EXPECTED if not _label_matches(a, shown)] == []
            U.save_small(driver.get_screenshot_as_png(), shots / "dagster_asset_graph.png")

            # -- the evaluation's metadata: the grid opens as a picture of readable size
            driver.get(f"{dagster}/assets/evaluation_samples?partition={U.NAME}")
            _wait_for(driver, lambda: driver.find_elements(By.XPATH, "//*[text()='[Show Markdown]']"), what="metadata")
            _skip_dagster_welcome(driver)
            page = driver.page_source
            for metric in ("transfer_rate", "fid_judge_floor", "cycle_error", "mlflow_run"):
                assert metric in page
            assert f'href="{run_link}"' in page.replace("&amp;", "&")
            driver.find_elements(By.XPATH, "//*[text()='[Show Markdown]']")[0].click()
            img = _wait_for(
                driver,
                lambda: [
                    i
                    for i in driver.find_elements(By.TAG_NAME, "img")
                    if (i.get_attribute("src") or "").startswith("data:image/png")
                ],
                what="grid image",
            )[0]
            loaded = driver.execute_script(
                "return [arguments[0].complete, arguments[0].naturalWidth, arguments[0].naturalHeight,"
                " arguments[0].getBoundingClientRect().width]",
                img,
            )
            assert loaded[0] and loaded[1] >= 360 and loaded[2] > 0 and loaded[3] >= 360, loaded
            time.sleep(1)
            U.save_small(driver.get_screenshot_as_png(), shots / "dagster_evaluation_grid.png")

            # -- check results with their partition
            driver.get(f"{dagster}/assets/evaluation_samples?view=checks")
            _wait_for(driver, lambda: f"partition '{U.NAME}'" in driver.page_source, what="check result")
            _skip_dagster_welcome(driver)
            assert "Partition" in driver.page_source
            time.sleep(1)
            U.save_small(driver.get_screenshot_as_png(), shots / "dagster_checks.png")

            # -- MLflow: the link from Dagster works on this port, the experiment opens on its runs
            driver.get(mlflow_ui)
            driver.execute_script(
                "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')"
            )
            driver.get(run_link)
            _wait_for(driver, lambda: "velocity/loss" in driver.page_source, what="the velocity run's metrics")
            assert f"velocity {U.NAME}" in driver.page_source
            driver.get(runs_link)
            _wait_for(driver, lambda: f"saliency {U.NAME}" in driver.page_source, what="the runs table")
            page = driver.page_source
            assert f"velocity {U.NAME}" in page and f"{U.NAME}-manifest" in page and "Detect Issues" not in page
            time.sleep(2)
            U.save_small(driver.get_screenshot_as_png(), shots / "mlflow_runs.png")
            # the run comparison: MLflow 3's chart view of the experiment's runs, one chart per metric
            for button in driver.find_elements(By.XPATH, "//button[@aria-label='Close']"):  # the assistant panel
                button.click()
            driver.execute_script("arguments[0].click()", driver.find_element(By.XPATH, "//input[@value='CHART']"))
            text = lambda: driver.execute_script("return document.body.innerText")  # noqa: E731 - what is rendered
            _wait_for(driver, lambda: "eval/fid_judge_floor" in text(), what="the metric charts")
            shown = text()
            for group in ("eval", "velocity", "saliency"):
                assert re.search(rf"^{group}\s*\(\d+\)$", shown, re.M), f"no chart section '{group}'"
            runs_listed = re.findall(rf"^velocity {U.NAME}$", shown, re.M)
            assert len(runs_listed) >= 2, shown[:2000]  # both trainings' velocity runs side by side
            time.sleep(2)
            U.save_small(driver.get_screenshot_as_png(), shots / "mlflow_compare.png")
        finally:
            driver.quit()
    assert sorted(p.name for p in shots.glob("*.png")) == sorted(
        [
            "dagster_asset_graph.png",
            "dagster_evaluation_grid.png",
            "dagster_checks.png",
            "mlflow_runs.png",
            "mlflow_compare.png",
        ]
    )
    shutil.rmtree(tmp_path / "screens", ignore_errors=True)
