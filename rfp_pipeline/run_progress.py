"""Live console progress of a Dagster run: each stage as it starts and as it ends, with its time
and key figures, each check's verdict, and a progress bar while a training stage runs.

Nothing here re-runs or re-times the pipeline: stages come from the run's own event log in the
Dagster instance (STEP_START, ASSET_MATERIALIZATION with its metadata, ASSET_CHECK_EVALUATION,
STEP_SKIPPED, STEP_FAILURE), training progress from the metrics the training asset logs to its
MLflow run. `RunProgress` polls both from a daemon thread while the run executes in the caller's
thread (so Ctrl-C still stops the run).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable, TextIO

import dagster as dg

# metadata shown when an asset materialises, in this order (what a reader looks for first)
KEY_FIGURES: dict[str, tuple[str, ...]] = {
    "experiment_config": ("max_size", "generative"),
    "media_manifest": ("frames_ok", "frames_skipped", "domain0_ok", "domain1_ok", "frames_decoded"),
    "frame_store": ("frames_domain0", "frames_domain1", "store_mb"),
    "structure_embeddings": ("encoder_id", "computed", "cached"),
    "structure_pairs": ("dagster/row_count", "top1_similarity_mean"),
    "codec_checkpoint": ("codec", "recon_l1", "steps"),
    "saliency_checkpoint": ("accuracy", "accuracy_threshold", "steps"),
    "velocity_checkpoint": ("final_loss", "steps", "images_per_s", "registered_model"),
    "evaluation_samples": ("transfer_rate", "mask_iou", "fd", "cycle_error", "champion"),
    "translated_media": ("outputs", "video_frames", "flicker_ratio_mean"),
    "reflow_couplings": ("pairs", "shards_solved", "solver"),
    "reflow_checkpoint": ("rounds", "retrained"),
    "distilled_checkpoint": ("one_step_transfer_rate", "one_step_mask_iou", "one_step_ms_per_image"),
}
# training stage -> (MLflow run-name prefix, the metrics the progress bar shows; the first sets its step)
TRAINING: dict[str, tuple[str, tuple[str, ...]]] = {
    "codec_checkpoint": ("codec", ("codec/l1",)),
    "saliency_checkpoint": ("saliency", ("saliency/loss", "saliency/accuracy")),
    "velocity_checkpoint": ("velocity", ("velocity/loss", "velocity/images_per_s")),
}
EVENTS = {
    dg.DagsterEventType.STEP_START,
    dg.DagsterEventType.ASSET_MATERIALIZATION,
    dg.DagsterEventType.ASSET_CHECK_EVALUATION,
    dg.DagsterEventType.STEP_SKIPPED,
    dg.DagsterEventType.STEP_FAILURE,
    dg.DagsterEventType.STEP_UP_FOR_RETRY,
}


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def key_figures(asset: str, metadata: dict[str, Any]) -> str:
    """The figures of `asset`'s materialisation metadata worth a console line ("" for none)."""
    md = {k: _value(v) for k, v in metadata.items()}
    if md.get("skipped") is True:
        return f"skipped: {md.get('reason', '')}"
    keys = KEY_FIGURES.get(asset, ())
    return ", ".join(f"{k.removeprefix('dagster/')} {_fmt(md[k])}" for k in keys if k in md and md[k] is not None)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def format_event(entry, started: dict[str, float], t0: float) -> str | None:
    """One console line for a run event, or None for events not shown. `started` maps step keys
    to their start times (filled here from STEP_START); `t0` is the run's start (the clock)."""
    ev = entry.dagster_event
    clock = time.strftime("%M:%S", time.gmtime(max(0.0, entry.timestamp - t0)))
    if ev is None:
        # a plain error log of a step, e.g. "Dependencies for step ... failed ... Not executing."
        if entry.step_key and entry.level >= logging.ERROR:
            return f"[{clock}] {entry.step_key}: {entry.user_message}"
        return None
    if ev.event_type not in EVENTS:
        return None
    step = ev.step_key or ""
    kind = ev.event_type
    if kind == dg.DagsterEventType.STEP_START:
        started[step] = entry.timestamp
        return f"[{clock}] {step}: started"
    if kind == dg.DagsterEventType.ASSET_MATERIALIZATION:
        asset = ev.asset_key.to_user_string() if ev.asset_key else step
        took = entry.timestamp - started.get(step, entry.timestamp)
        figures = key_figures(asset, ev.event_specific_data.materialization.metadata)
        return f"[{clock}] {asset}: done in {_duration(took)}" + (f" -- {figures}" if figures else "")
    if kind == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
        check = ev.asset_check_evaluation_data
        verdict = "passed" if check.passed else "FAILED"
        figures = ", ".join(f"{k} {_fmt(_value(v))}" for k, v in check.metadata.items())
        return f"[{clock}]   check {check.check_name}: {verdict}" + (f" ({figures})" if figures else "")
    if kind == dg.DagsterEventType.STEP_SKIPPED:
        return f"[{clock}] {step}: not run (an upstream blocking check failed or its input is missing)"
    if kind == dg.DagsterEventType.STEP_UP_FOR_RETRY:
        return f"[{clock}] {step}: will retry ({ev.message or 'transient error'})"
    if kind == dg.DagsterEventType.STEP_FAILURE:
        err = getattr(ev.event_specific_data, "error", None)
        msg = " ".join((err.message if err is not None else ev.message or "").split())[:300]
        return (
            f"[{clock}] {step}: FAILED after {_duration(entry.timestamp - started.get(step, entry.timestamp))}: {msg}"
        )
    return None


class _TrainingBar:
    """A tqdm bar fed from the metric history of the stage's running MLflow run; it appears with
    the first logged step (a stage that trains nothing shows none) and redraws only on a new one."""

    def __init__(self, client, experiment: str, stage: str, since: float, total: int | None, out: TextIO):
        self.client, self.experiment, self.since, self.total, self.out = client, experiment, since, total, out
        self.prefix, self.metrics = TRAINING[stage]
        self.run_id: str | None = None
        self.bar = None
        self.step = -1

    def _find_run(self) -> str | None:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return None
        runs = self.client.search_runs(
            [exp.experiment_id],
            max_results=1,
            order_by=["attributes.start_time DESC"],
            filter_string=f"attributes.run_name = '{self.prefix} {self.experiment}' and attributes.status = 'RUNNING' "
            f"and attributes.start_time >= {int(self.since * 1000) - 5000}",
        )
        return runs[0].info.run_id if runs else None

    def poll(self) -> None:
        from tqdm.auto import tqdm

        self.run_id = self.run_id or self._find_run()
        if self.run_id is None:
            return
        history = self.client.get_metric_history(self.run_id, self.metrics[0])
        if not history:
            return
        step = max(m.step for m in history) + 1
        if step == self.step:
            return
        post = {}
        for key in self.metrics:
            hist = history if key == self.metrics[0] else self.client.get_metric_history(self.run_id, key)
            if hist:
                post[key.split("/")[-1]] = f"{max(hist, key=lambda m: m.step).value:.4g}"
        step = min(step, self.total or step)
        if self.bar is None:  # starts at the first step seen (a resumed run's too): the rate counts from here
            self.bar = tqdm(
                total=self.total,
                initial=step,
                desc=f"  {self.prefix}",
                unit="step",
                file=self.out,
                dynamic_ncols=True,
                leave=False,
                mininterval=0,
            )
        else:
            self.bar.update(step - self.bar.n)
        self.bar.set_postfix(post)
        self.step = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunProgress:
    """`with RunProgress(instance, ("rfp/progress", token), ...): dg.materialize(..., tags={"rfp/progress": token})`
    prints the run's progress to `out` while it executes and drains the last events on exit."""

    def __init__(
        self,
        instance: dg.DagsterInstance,
        tag: tuple[str, str] | None = None,
        experiment: str = "",
        tracking_uri: str | None = None,
        totals: dict[str, int | None] | None = None,
        out: TextIO = sys.stderr,
        poll_s: float = 1.0,
        run_id: str | None = None,
    ):
        self.instance, self.tag, self.experiment = instance, tag, experiment
        self.tracking_uri, self.totals, self.out, self.poll_s = tracking_uri, totals or {}, out, poll_s
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rfp-run-progress", daemon=True)
        self._bar: _TrainingBar | None = None
        self._client = None
        self._cursor: str | None = None
        self._started: dict[str, float] = {}
        self._run_id = run_id  # known already, or found by `tag` once the run exists
        self._t0 = time.time()
        self._last_error = ""

    def __enter__(self) -> "RunProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._drain()  # events written after the thread's last poll
        self._close_bar()

    def _emit(self, line: str) -> None:
        from tqdm.auto import tqdm

        self.lines.append(line)
        tqdm.write(line, file=self.out)
        self.out.flush()

    def _find_run(self) -> str | None:
        if self.tag is None:
            return None
        runs = self.instance.get_runs(filters=dg.RunsFilter(tags={self.tag[0]: self.tag[1]}), limit=1)
        return runs[0].run_id if runs else None

    def _drain(self) -> None:
        if self._run_id is None:
            self._run_id = self._find_run()
            if self._run_id is None:
                return
        while True:
            # every record, not only EVENTS: a step that will not run says so in a plain log line
            conn = self.instance.get_records_for_run(self._run_id, cursor=self._cursor)
            self._cursor = conn.cursor
            for rec in conn.records:
                self._on_event(rec.event_log_entry)
            if not conn.has_more:
                return

    def _on_event(self, entry) -> None:
        ev = entry.dagster_event
        step = ev.step_key if ev else None
        if ev is not None and ev.event_type != dg.DagsterEventType.STEP_START and step in TRAINING:
            if self._bar is not None and ev.event_type != dg.DagsterEventType.ASSET_CHECK_EVALUATION:
                self._bar.poll()
                self._close_bar()
        line = format_event(entry, self._started, self._t0)
        if line:
            self._emit(line)
        if ev is not None and ev.event_type == dg.DagsterEventType.STEP_START and step in TRAINING:
            self._open_bar(step, entry.timestamp)

    def _open_bar(self, stage: str, since: float) -> None:
        if not self.tracking_uri or not self.experiment:
            return
        from mlflow import MlflowClient

        self._client = self._client or MlflowClient(self.tracking_uri)
        self._close_bar()
        self._bar = _TrainingBar(self._client, self.experiment, stage, since, self.totals.get(stage), self.out)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._drain()
                if self._bar is not None:
                    self._bar.poll()
            except Exception as exc:  # noqa: BLE001 - a display hiccup (a locked sqlite read) must not end the run
                msg = f"(progress display: {type(exc).__name__}: {exc})"
                if msg != self._last_error:  # once, not every poll
                    self._emit(msg)
                self._last_error = msg


def training_totals(cfg) -> dict[str, int | None]:
    """Steps each training stage plans, for the bars' totals (None where the config does not say)."""
    get: Callable[[str, str], int | None] = lambda sec, key: getattr(getattr(cfg, sec, None), key, None)  # noqa: E731
    return {
        "velocity_checkpoint": get("velocity", "total_steps"),
        "saliency_checkpoint": getattr(cfg, "saliency_step_limit", None),
        "codec_checkpoint": None,
    }


def replay(instance: dg.DagsterInstance, run_id: str, out: TextIO = sys.stderr) -> list[str]:
    """The progress lines of a run that has finished (or is running), from its event log."""
    progress = RunProgress(instance, out=out, run_id=run_id)
    progress._t0 = instance.get_run_stats(run_id).start_time or progress._t0  # the clock starts with the run
    progress._drain()
    return progress.lines
