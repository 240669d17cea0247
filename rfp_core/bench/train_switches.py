"""`rfp bench train --switches`: every speed switch of the velocity phase (train/speed.py) off and on.

Per net config (configs/tiny.json's nets; the original trainer's `small`; its `small_dit` for the
attention kernel and bf16), the velocity training
step `rfp bench train` times (UNet forward, the fast saliency loss, backward, AdamW step) runs in two
copies from the same weights: the switch off and on, in alternating blocks in one process, wall and
process CPU time, medians. The same copies first run a few steps on the same draws, and the largest
weight difference between them says whether the switch changes the numbers (0 = bit for bit the
same). Full mode writes the table into docs/BENCHMARKS.md between its markers.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from rfp_core.atomic import atomic_write_text
from rfp_core.bench.train import ORIGINAL_SMALL_64, ORIGINAL_SMALL_DIT_64, QUICK, TINY, _alternate
from rfp_core.config import DiTConfig, SaliencyNetConfig, UNetConfig, VelocityConfig
from rfp_core.device import pick_device
from rfp_core.flow import rf
from rfp_core.nets import build_velocity_net
from rfp_core.nets.saliency import SaliencyNet
from rfp_core.train import speed

# switch -> (off, on): VelocityConfig fields, plus "tf32" (the CUDA TF32 flags, no config field)
SWITCHES: dict[str, tuple[dict, dict]] = {
    "channels_last": ({}, {"channels_last": True}),
    "adamw_foreach": ({}, {"adamw": "foreach"}),
    "adamw_fused": ({}, {"adamw": "fused"}),
    "compile": ({}, {"compile": True}),
    "threads_1_vs_2": ({"cpu_threads": 1}, {"cpu_threads": 2}),
    "tf32": ({}, {"tf32": True}),
    "bf16": ({}, {"bf16": True}),
    # the attention kernel torch's SDPA dispatches to: the plain math path against the flash kernel
    "sdpa_flash": ({"sdpa": "math"}, {"sdpa": "flash"}),
}
QUICK_SKIP = ("compile",)  # minutes of compiling on a small machine: full mode only
ATTENTION_SWITCHES = ("sdpa_flash",)  # only nets with attention (the DiT) have something to switch
NUMERIC_STEPS = 3
DOCS = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- bench train --switches: begin -->", "<!-- bench train --switches: end -->"
COMMAND = "OMP_NUM_THREADS=1 nice -n 10 rfp bench train --switches --device cpu"


_SDPA = {
    "math": [SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION],
    # torch's own choice among all of them
    None: [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH],
}


@contextlib.contextmanager
def _settings(threads: int | None, tf32: bool, sdpa: str | None = None) -> Iterator[None]:
    """Intra-op threads, the TF32 flags and the SDPA kernels for one step, restored after it."""
    old = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    old_precision = torch.get_float32_matmul_precision()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else old_precision)
    try:
        with sdpa_kernel(_SDPA[sdpa]):
            yield
    finally:
        torch.set_num_threads(old[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[1], old[2]
        torch.set_float32_matmul_precision(old_precision)


def _setup(spec: dict, dev: torch.device) -> dict:
    torch.manual_seed(0)
    sal = SaliencyNet(SaliencyNetConfig(backbone=spec["backbone"], pretrained=False)).to(dev).eval()
    net_cfg = spec["unet"]
    base = build_velocity_net((DiTConfig if net_cfg.get("type") == "DiT" else UNetConfig)(**net_cfg)).to(dev)
    b, s = spec["batch"], spec["size"]
    x0 = torch.rand(b, 3, s, s, device=dev) * 2 - 1
    x1 = torch.rand(b, 3, s, s, device=dev) * 2 - 1
    return {"h": sal.requires_grad_(False).frozen_h(), "base": base, "x0": x0, "x1": x1, "dev": dev}


def _stepper(ctx: dict, variant: dict) -> tuple[Callable[[], None], torch.nn.Module]:
    """One training step of a fresh copy of the net with `variant`'s switches, and that copy."""
    variant = dict(variant)
    tf32, sdpa = variant.pop("tf32", False), variant.pop("sdpa", None)
    # every switch against the plain float32 path (bf16's default, None, means "where native")
    vc = VelocityConfig(learning_rate=2e-4, weight_decay=1e-4, **{"bf16": False, **variant})
    net = speed.prepare_net(copy.deepcopy(ctx["base"]), vc)
    opt = speed.make_optimizer(net, vc)
    forward = speed.compiled(net, vc)
    autocast = speed.velocity_autocast(vc, ctx["dev"])
    gen = torch.Generator().manual_seed(0)
    x0, x1 = ctx["x0"], ctx["x1"]

    def step() -> None:
        with _settings(vc.cpu_threads, tf32, sdpa):
            t = rf.sample_timesteps(x0.shape[0], "logit-normal", ctx["dev"], generator=gen)
            xt, target = rf.interpolate(x0, x1, t), x1 - x0
            with autocast:
                v = forward(xt, t)
            loss = rf.saliency_weighted_loss(ctx["h"], xt, target, v.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step, net


def measure_switch(ctx: dict, spec: dict, off: dict, on: dict, steps: int = NUMERIC_STEPS) -> dict:
    """Off and on: the weight difference after `steps` equal steps, then alternating timings."""
    sync = torch.cuda.synchronize if ctx["dev"].type == "cuda" else (lambda: None)
    (step_off, net_off), (step_on, net_on) = _stepper(ctx, off), _stepper(ctx, on)
    first = {}
    for name, step in (("off", step_off), ("on", step_on)):
        start = time.perf_counter()
        for _ in range(steps):
            step()
            first.setdefault(name, time.perf_counter() - start)  # the first step (compiling, if it does)
        sync()
    diff = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(net_off.parameters(), net_on.parameters()))
    wall, cpu = _alternate({"off": step_off, "on": step_on}, spec["rounds"], spec["block"], sync, "switch")
    return {
        "ms_per_step": {k: round(v, 1) for k, v in wall.items()},
        "cpu_ms_per_step": {k: round(v, 1) for k, v in cpu.items()},
        "speedup_wall": round(wall["off"] / wall["on"], 3),
        "speedup_cpu": round(cpu["off"] / cpu["on"], 3),
        "max_weight_diff": diff,
        "numeric_steps": steps,
        "first_step_s": {k: round(v, 2) for k, v in first.items()},
    }


def run(quick: bool = False, device: str | None = None, docs: Path | None = None) -> dict:
    """The on/off table per config; full mode writes it into `docs` (docs/BENCHMARKS.md by default)."""
    dev = pick_device(device)
    load_before = os.getloadavg()
    result: dict = {"configs": {}}
    plain = [n for n in SWITCHES if n not in ATTENTION_SWITCHES]
    plan = [(QUICK, plain)] if quick else [(dict(TINY, rounds=8, block=1), plain), (ORIGINAL_SMALL_64, plain)]
    plan += [] if quick else [(ORIGINAL_SMALL_DIT_64, [*ATTENTION_SWITCHES, "bf16"])]
    for spec, names in plan:
        ctx = _setup(spec, dev)
        rows = {}
        for name in names:
            off, on = SWITCHES[name]
            if quick and name in QUICK_SKIP:
                continue
            print(f"[bench train --switches] {spec['name']}: {name}", flush=True)
            try:
                rows[name] = measure_switch(ctx, spec, off, on, steps=2 if quick else NUMERIC_STEPS)
            except Exception as exc:  # noqa: BLE001 - e.g. torch.compile without a working compiler: say so, go on
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        result["configs"][spec["name"]] = {"sizes": spec["sizes"], "batch": spec["batch"], "switches": rows}
    result.update(
        device=str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        load_average={"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    table = markdown(result)
    print(table, flush=True)
    if docs is not None or not quick:
        result["docs"] = str(write_docs(table, docs or DOCS))
    return result


def markdown(result: dict) -> str:
    """The on/off table, with how and where it was measured."""
    load = result["load_average"]
    lines = [
        f"Measured {result['date']} by `{COMMAND}` on {result['device']} ({result['machine']}, torch "
        f"{result['torch']}); load average {load['before'][0]} before, {load['after'][0]} after (other jobs "
        "share the machine: compare the columns, not with other tables). Off and on alternate in one "
        f"process; medians. Weight diff: largest |off − on| after {NUMERIC_STEPS} equal steps (0 = same numbers).",
        "",
        "| nets | switch | ms/step off / on (wall) | CPU ms/step off / on | speed-up wall / CPU "
        "| max weight diff | first step off / on (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, cfg in result["configs"].items():
        for switch, r in cfg["switches"].items():
            if "error" in r:
                lines.append(f"| {name} (batch {cfg['batch']}) | `{switch}` | failed: {r['error']} | | | | |")
                continue
            ms, cpu, first = r["ms_per_step"], r["cpu_ms_per_step"], r["first_step_s"]
            lines.append(
                f"| {name} (batch {cfg['batch']}) | `{switch}` | {ms['off']} / {ms['on']} | {cpu['off']} / {cpu['on']} "
                f"| {r['speedup_wall']} / {r['speedup_cpu']} | {r['max_weight_diff']:.3g} "
                f"| {first['off']} / {first['on']} |"
            )
    return "\n".join(lines)


def write_docs(table: str, path: Path) -> Path:
    """Replace the text between the markers in `path` (appended, with them, where they are missing)."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + f"## Speed switches — `{COMMAND}`\n\n{block}\n"
    return atomic_write_text(path, text)
