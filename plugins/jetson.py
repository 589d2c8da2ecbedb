"""Jetson profiler: samples `tegrastats` while a benchmark runs and reports power, load, temperatures and
energy per inference. Registers the `jetson` evaluator and the `trtkit jetson` command group.

tegrastats line formats understood (one sample per line, fields in any order, unknown fields ignored):
- JetPack 4 (Nano/TX2):  `RAM 1442/3964MB (lfb ..) ... CPU [10%@1479,...] EMC_FREQ 3%@1600 GR3D_FREQ 38%@921
  ... CPU@25.5C ... POM_5V_IN 2395/2195 POM_5V_GPU 412/300` (rails in mW without a unit).
- JetPack 5 (Xavier, Orin; L4T R35): optional `MM-DD-YYYY HH:MM:SS` prefix, `GR3D_FREQ 87%@[1300,1300]` (per GPC)
  or `GR3D_FREQ 0%@114`, temperatures `CPU@47.5C` (`-256C` = sensor absent), rails `VDD_GPU_SOC 11535mW/7357mW`
  (instantaneous/average).
- JetPack 6 (Orin; L4T R36): `GR3D_FREQ 64%` without frequency or `GR3D_FREQ 45%@[612]`, lower-case sensor
  names `gpu@44.218C`, rails as in JetPack 5 (`VDD_IN`, `VDD_CPU_GPU_CV`, `VDD_SOC` on Orin Nano/NX).

Total power: the module input rail when tegrastats has one (`VDD_IN`, `POM_5V_IN`), else the sum of all rails
(`NC` rails excluded); the result says which.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from trtkit import hookimpl
from trtkit.cli_args import JsonFlag, options_flag, parse_options
from trtkit.errors import InputFileError, OptionError, TrtkitError
from trtkit.stages import EvaluationResult, Evaluator, Option

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")

_TIMESTAMP = re.compile(r"^(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_ABSENT_SENSOR = -256.0


class JetsonError(TrtkitError):
    """tegrastats is missing or produced nothing usable."""


@dataclass
class TegraSample:
    """One tegrastats line. Loads in %, frequencies in MHz, temperatures in C, power in mW."""

    timestamp: str | None = None
    host_time: float | None = None  # time.perf_counter() when the line was read (profiler only)
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    cpu_load: list[int | None] = field(default_factory=list)  # None for offline cores
    cpu_freq: list[int | None] = field(default_factory=list)
    emc_load: int | None = None
    emc_freq: int | None = None
    gpu_load: int | None = None
    gpu_freq: list[int] = field(default_factory=list)
    temperatures: dict[str, float] = field(default_factory=dict)
    rails: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (current mW, average mW)

    @property
    def power_mw(self) -> float | None:
        """Total power: the module input rail if present, else the sum of the rails (None without rails)."""
        for name in TOTAL_RAILS:
            if name in self.rails:
                return self.rails[name][0]
        if not self.rails:
            return None
        return float(sum(current for current, _ in self.rails.values()))

    @property
    def power_source(self) -> str:
        for name in TOTAL_RAILS:
            if name in self.rails:
                return name
        return "sum of " + "+".join(sorted(self.rails)) if self.rails else "none"

    @property
    def cpu_mean_load(self) -> float | None:
        online = [load for load in self.cpu_load if load is not None]
        return sum(online) / len(online) if online else None


def parse_line(line: str) -> TegraSample | None:
    """Parse one tegrastats line (JetPack 4, 5 or 6). Returns None for lines that are not samples."""
    text = line.strip()
    if "RAM " not in text:
        return None
    sample = TegraSample()
    stamp = _TIMESTAMP.match(text)
    if stamp:
        sample.timestamp = stamp.group(1)
        text = text[stamp.end():]
    if match := _RAM.search(text):
        sample.ram_used_mb, sample.ram_total_mb = int(match.group(1)), int(match.group(2))
    if match := _SWAP.search(text):
        sample.swap_used_mb = int(match.group(1))
    if match := _CPU.search(text):
        for core in match.group(1).split(","):
            core = core.strip()
            if not core or core == "off":
                sample.cpu_load.append(None)
                sample.cpu_freq.append(None)
                continue
            load, _, freq = core.partition("@")
            sample.cpu_load.append(int(load.rstrip("%")) if load.rstrip("%").isdigit() else None)
            sample.cpu_freq.append(int(freq) if freq.isdigit() else None)
    if match := _EMC.search(text):
        sample.emc_load = int(match.group(1))
        sample.emc_freq = int(match.group(2)) if match.group(2) else None
    if match := _GR3D.search(text):
        sample.gpu_load = int(match.group(1))
        sample.gpu_freq = [int(f) for f in (match.group(2) or "").split(",") if f]
    rest = _CPU.sub(" ", text)  # core entries look like temperatures/rails otherwise
    for name, value in _TEMP.findall(rest):
        temperature = float(value)
        if temperature != _ABSENT_SENSOR:
            sample.temperatures[name] = temperature
    for name, current, average in _RAIL.findall(rest):
        if name in ("RAM", "SWAP", "IRAM", "NC"):
            continue
        sample.rails[name] = (float(current), float(average))
    return sample


def parse_lines(lines: Any) -> list[TegraSample]:
    return [s for s in (parse_line(line) for line in lines) if s is not None]


def parse_file(path: str | Path) -> list[TegraSample]:
    file = Path(path)
    if not file.is_file():
        raise InputFileError(f"{file}: no such file (tegrastats log)")
    samples = parse_lines(file.read_text(errors="replace").splitlines())
    if not samples:
        raise InputFileError(f"{file}: no tegrastats lines found")
    return samples


def summarize(samples: list[TegraSample]) -> dict[str, Any]:
    """Averages and peaks over samples: power (total and per rail), GPU/CPU/EMC load, temperatures."""
    import numpy as np

    def stat(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        array = np.asarray(values, dtype=np.float64)
        return {"mean": float(array.mean()), "max": float(array.max()), "min": float(array.min())}

    rails = sorted({name for s in samples for name in s.rails})
    temps = sorted({name for s in samples for name in s.temperatures})
    return {
        "samples": len(samples),
        "power_source": samples[0].power_source if samples else "none",
        "power_mw": stat([s.power_mw for s in samples if s.power_mw is not None]),
        "rails_mw": {name: stat([s.rails[name][0] for s in samples if name in s.rails]) for name in rails},
        "gpu_load": stat([float(s.gpu_load) for s in samples if s.gpu_load is not None]),
        "cpu_load": stat([s.cpu_mean_load for s in samples if s.cpu_mean_load is not None]),
        "emc_load": stat([float(s.emc_load) for s in samples if s.emc_load is not None]),
        "ram_used_mb": stat([float(s.ram_used_mb) for s in samples if s.ram_used_mb is not None]),
        "temperatures_c": {name: stat([s.temperatures[name] for s in samples if name in s.temperatures])
                           for name in temps},
    }


def energy_joules(samples: list[TegraSample], start: float, end: float) -> tuple[float, float]:
    """Energy (J) and mean power (W) over [start, end] (perf_counter seconds) from timed samples.

    Power is taken as piecewise linear between samples (held constant before the first / after the last),
    integrated with the trapezoid rule.
    """
    import numpy as np

    timed = sorted((s.host_time, s.power_mw) for s in samples if s.host_time is not None and s.power_mw is not None)
    if not timed or end <= start:
        raise JetsonError("no timed tegrastats power samples cover the benchmark")
    times = np.array([t for t, _ in timed])
    watts = np.array([p for _, p in timed]) / 1000.0
    inside = times[(times > start) & (times < end)]
    grid = np.concatenate([[start], inside, [end]])
    power = np.interp(grid, times, watts)
    energy = float(np.sum((power[1:] + power[:-1]) * np.diff(grid)) / 2.0)
    return energy, energy / (end - start)


class TegrastatsProfiler:
    """Runs `tegrastats --interval MS` in the background and stamps every line with time.perf_counter()."""

    def __init__(self, executable: str = "tegrastats", interval_ms: int = 100) -> None:
        found = shutil.which(executable)
        if found is None:
            raise JetsonError(
                f"tegrastats not found ('{executable}'): the jetson profiler needs a Jetson with JetPack "
                "(tegrastats ships with L4T); give its path with -O tegrastats=PATH")
        if interval_ms < 10:
            raise OptionError(f"option 'interval_ms' must be >= 10, got {interval_ms}")
        self.command = [found, "--interval", str(int(interval_ms))]
        self.interval = interval_ms / 1000.0
        self.samples: list[TegraSample] = []
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TegrastatsProfiler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, wait_s: float = 5.0) -> None:
        self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        deadline = time.perf_counter() + wait_s
        while not self.samples and time.perf_counter() < deadline and self._process.poll() is None:
            time.sleep(0.01)
        if not self.samples:
            self.stop()
            raise JetsonError(f"{self.command[0]} printed no tegrastats sample within {wait_s:g} s")

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            sample = parse_line(line)
            if sample is not None:
                sample.host_time = time.perf_counter()
                self.samples.append(sample)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()  # only the process this profiler started
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._process = None

    def wait_for_sample_after(self, moment: float, timeout: float = 2.0) -> None:
        """Block until a sample read after `moment` arrives (so the end of a run is covered)."""
        deadline = time.perf_counter() + max(timeout, 3 * self.interval)
        while time.perf_counter() < deadline:
            if any(s.host_time is not None and s.host_time >= moment for s in self.samples):
                return
            time.sleep(self.interval / 4)


# ---- evaluator --------------------------------------------------------------------------------------------
def profile(models: list[str], tegrastats: str = "tegrastats", interval_ms: int = 100, **speed: Any,
            ) -> EvaluationResult:
    """Benchmark each model (speed evaluator semantics) while sampling tegrastats; energy per inference."""
    from trtkit.plugins.evaluators.speed import benchmark, summary_table

    rows = []
    for path in models:
        profiler = TegrastatsProfiler(tegrastats, interval_ms)
        window: list[float] = []

        def mark(t0: float, t1: float, window: list[float] = window) -> None:
            if not window:
                window.extend([t0, t1])
            window[1] = t1

        with profiler:
            row = benchmark(path, on_iteration=mark, **speed)
            profiler.wait_for_sample_after(window[1])
        start, end = window
        inside = [s for s in profiler.samples if s.host_time is not None and start <= s.host_time <= end]
        energy, mean_w = energy_joules(profiler.samples, start, end)
        per_inference = energy / row["iterations"]
        row["jetson"] = {
            "energy_j": energy, "mean_power_w": mean_w, "energy_per_inference_mj": per_inference * 1000.0,
            "energy_per_sample_mj": per_inference * 1000.0 / max(1, row["batch"]),
            "samples_in_run": len(inside), "window_s": end - start,
            "summary": summarize(inside or profiler.samples),
        }
        if len(inside) < 2:
            row["jetson"]["warning"] = ("fewer than 2 tegrastats samples during the run: lower interval_ms or "
                                        "raise duration_s")
        rows.append(row)
    base = rows[0]["latency"]["median_ms"]
    for row in rows:
        row["speedup"] = base / row["latency"]["median_ms"]
    lines = [summary_table(rows), "", f"{'model':<28} {'power W':>8} {'mJ/inference':>13} {'GPU %':>6} samples"]
    for row in rows:
        j = row["jetson"]
        gpu = (j["summary"]["gpu_load"] or {}).get("mean")
        lines.append(f"{Path(row['model']).name[:28]:<28} {j['mean_power_w']:>8.2f} "
                     f"{j['energy_per_inference_mj']:>13.3f} {'' if gpu is None else f'{gpu:.0f}':>6} "
                     f"{j['samples_in_run']} ({j['summary']['power_source']})")
        if "warning" in j:
            lines.append(f"warning: {Path(row['model']).name}: {j['warning']}")
    return EvaluationResult(data={"models": rows}, summary="\n".join(lines), passed=True)


def _evaluate(models: list[str], **options: Any) -> EvaluationResult:
    return profile(models, **options)


def _options() -> dict[str, Option]:
    from trtkit.plugins.evaluators import SPEED_OPTIONS

    return {
        **SPEED_OPTIONS,
        "tegrastats": Option("str", "tegrastats", "tegrastats executable (name on PATH or path)"),
        "interval_ms": Option("int", 100, "tegrastats sampling interval (ms)"),
    }


@hookimpl
def register_evaluators(register: Any) -> None:
    register(Evaluator(name="jetson", description="Speed benchmark with tegrastats power/load/temperature sampling"
                       " and energy per inference (Jetson only)", options=_options(), evaluate=_evaluate,
                       compares="all"))


@hookimpl
def register_commands(cli: Any) -> None:
    import typer

    app = typer.Typer(help="Jetson tools: parse tegrastats logs, profile energy per inference.",
                      no_args_is_help=True)

    @app.command("parse")
    def parse_command(
        log: Path = typer.Argument(..., help="A file of tegrastats lines (JetPack 4, 5 or 6)."),
        as_json: JsonFlag = False,
    ) -> None:
        """Summarize a recorded tegrastats log: power per rail, GPU/CPU/EMC load, temperatures."""
        from trtkit.evaluation import to_json
        from trtkit.ui import console, stdout

        summary = summarize(parse_file(log))
        if as_json:
            stdout.print(to_json(summary), markup=False, highlight=False)
            return
        console.print(_summary_text(summary), markup=False, highlight=False, soft_wrap=True)

    @app.command("profile")
    def profile_command(
        models: list[Path] = typer.Argument(..., help="Artefacts to benchmark (engines, ONNX)."),
        option: Annotated[list[str] | None, options_flag("Speed")] = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Benchmark while sampling tegrastats: power, loads, temperatures, energy per inference."""
        from trtkit.evaluation import evaluate, to_json
        from trtkit.ui import console, stdout

        result = evaluate("jetson", [str(m) for m in models], **parse_options(option))
        if as_json:
            stdout.print(to_json({"evaluator": "jetson", "passed": result.passed, "data": result.data}),
                         markup=False, highlight=False)
        console.print(result.summary, markup=False, highlight=False, soft_wrap=True)

    cli.add_typer(app, name="jetson")


def _summary_text(summary: dict[str, Any]) -> str:
    lines = [f"{summary['samples']} samples; total power from {summary['power_source']}"]
    if summary["power_mw"]:
        p = summary["power_mw"]
        lines.append(f"power: mean {p['mean'] / 1000:.2f} W, max {p['max'] / 1000:.2f} W")
    for name, s in summary["rails_mw"].items():
        lines.append(f"  {name:<18} mean {s['mean']:8.0f} mW  max {s['max']:8.0f} mW")
    for key in ("gpu_load", "cpu_load", "emc_load"):
        if summary[key]:
            lines.append(f"{key.replace('_', ' ')}: mean {summary[key]['mean']:.1f} %, max {summary[key]['max']:.0f} %")
    for name, s in summary["temperatures_c"].items():
        lines.append(f"  {name:<10} mean {s['mean']:.1f} C  max {s['max']:.1f} C")
    return "\n".join(lines)
