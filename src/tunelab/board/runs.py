"""The runs the board shows: every run folder under one root, the ones it launched as
``tunelab train`` subprocesses and the ones the command line wrote.

A run the board launches gets ``board.json`` beside the engine's files: the overrides it was
launched with (what a resume repeats), the process id and every launch, stop and resume. The
status of any run is read from its files (``summary.json``: finished or stopped) and, while the
board holds its process, from the process itself. Stop sends SIGTERM: the engine finishes the step
it is in and writes a checkpoint (``tunelab.engine.trainer.StopRequest``); Resume launches the
same overrides again with ``method.ckpt_path=RUN/checkpoints``.
"""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tunelab.config import flatten
from tunelab.errors import UsageError

BOARD_FILE = "board.json"
LOG_FILE = "board.log"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, value: dict) -> None:
    from tunelab.resources import atomic_write_text

    atomic_write_text(path, json.dumps(value, indent=2))


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child that nobody waited for) has ended
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def read_metrics(path: Path) -> dict[str, list[list[float]]]:
    """metrics.csv as one series per column: ``{"train/loss": [[step, value], ...], ...}``."""
    series: dict[str, list[list[float]]] = {}
    try:
        with path.open() as f:
            for row in csv.DictReader(f):
                step = int(row.pop("step"))
                for key, value in row.items():
                    if value not in ("", None):
                        number = float(value)
                        if math.isfinite(number):
                            series.setdefault(key, []).append([step, number])
    except (OSError, ValueError):  # written atomically, so a half-written file is not expected; a foreign one is skipped
        return series
    return series


class RunBook:
    """Run folders under ``root``: launch, stop, resume, and what each holds."""

    def __init__(self, root: Path, python: str = sys.executable):
        self.root = Path(root)
        self.python = python
        self.processes: dict[str, subprocess.Popen] = {}

    # --- where runs are --------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        if not NAME.match(name or ""):
            raise UsageError(f"Run name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit (at most 64).")
        return self.root / name

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and any((p / f).exists() for f in (BOARD_FILE, "run.json", "config.yaml"))]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    # --- launch, stop, resume --------------------------------------------------------------
    def launch(self, name: str, overrides: list[str]) -> dict:
        """Start ``tunelab train OVERRIDES output_dir=ROOT/NAME`` in its own process group."""
        folder = self.folder(name)
        if folder.exists() and any(folder.iterdir()):
            raise UsageError(f"A run named '{name}' already exists in {self.root}: choose another name, or resume it.")
        overrides = [o for o in overrides if not o.startswith(("output_dir=", "progress_bar="))]
        folder.mkdir(parents=True, exist_ok=True)
        record = {"name": name, "overrides": overrides, "launched": time.strftime("%Y-%m-%d %H:%M:%S"), "events": []}
        return self._start(folder, record, [*overrides, f"output_dir={folder}"], "launch")

    def resume(self, name: str) -> dict:
        folder = self.folder(name)
        record = _read_json(folder / BOARD_FILE)
        if not record.get("overrides"):
            raise UsageError(f"'{name}' was not launched from the board, so its overrides are unknown: resume it with "
                             f"tunelab train ... method.ckpt_path={folder / 'checkpoints'}")  # fmt: skip
        current = self.status(name)["status"]
        if current in ("running", "stopping"):
            raise UsageError(f"'{name}' is still running: stop it before resuming.")
        if current == "finished":
            raise UsageError(f"'{name}' has finished: there is nothing to resume. Launch a new run to train further.")
        if not (folder / "checkpoints" / "latest").is_file():
            raise UsageError(f"'{name}' has no checkpoint to resume from yet ({folder / 'checkpoints'} holds none).")
        overrides = [o for o in record["overrides"] if not o.startswith("method.ckpt_path=")]
        command = [*overrides, f"output_dir={folder}", f"method.ckpt_path={folder / 'checkpoints'}"]
        return self._start(folder, record, command, "resume")

    def _start(self, folder: Path, record: dict, overrides: list[str], action: str) -> dict:
        log = open(folder / LOG_FILE, "ab")
        log.write(f"\n[board] {action}: tunelab train {' '.join(overrides)}\n".encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen([self.python, "-m", "tunelab", "train", *overrides, "progress_bar=false"], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=os.getcwd(), env=env, start_new_session=True)  # fmt: skip
        log.close()
        self.processes[folder.name] = process
        record.update(pid=process.pid, returncode=None, stop_requested=False)
        record["events"].append({"action": action, "at": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": process.pid})
        _write_json(folder / BOARD_FILE, record)
        return self.status(folder.name)

    def stop(self, name: str) -> dict:
        folder = self.folder(name)
        record = _read_json(folder / BOARD_FILE)
        process = self.processes.get(name)
        pid = process.pid if process is not None and process.poll() is None else (record.get("pid") if _pid_alive(record.get("pid")) else None)
        if pid is None:
            raise UsageError(f"'{name}' is not running.")
        os.kill(pid, signal.SIGTERM)  # the engine finishes its step, writes a checkpoint and exits
        record["stop_requested"] = True
        record.setdefault("events", []).append({"action": "stop", "at": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": pid})
        _write_json(folder / BOARD_FILE, record)
        return self.status(name)

    # --- what a run holds ------------------------------------------------------------------
    def status(self, name: str) -> dict:
        folder = self.folder(name)
        record = _read_json(folder / BOARD_FILE)
        marker = _read_json(folder / "run.json")
        summary = _read_json(folder / "summary.json")
        process = self.processes.get(name)
        returncode = process.poll() if process is not None else record.get("returncode")
        alive = process.poll() is None if process is not None else (record.get("returncode") is None and _pid_alive(record.get("pid")))
        if process is not None and returncode is not None and record.get("returncode") != returncode:
            record["returncode"] = returncode
            _write_json(folder / BOARD_FILE, record)
        if alive:
            status = "stopping" if record.get("stop_requested") else "running"
        elif summary and summary.get("global_step") is not None and returncode in (None, 0):
            status = "stopped" if summary.get("stopped") else "finished"
        elif returncode not in (None, 0):
            status = "stopped" if record.get("stop_requested") and (folder / "checkpoints" / "latest").is_file() else "failed"
        else:
            status = "incomplete"  # a command-line run that is still going, or one that died
        metrics = read_metrics(folder / "metrics.csv")
        step = max((points[-1][0] for key, points in metrics.items() if key.startswith("train/")), default=0)
        step_seconds = [v for _, v in metrics.get("train/step_seconds", [])][1:]  # the first step compiles and warms up
        recent = step_seconds[-20:]
        mean_step = sum(recent) / len(recent) if recent else None
        total = marker.get("total_steps")
        estimate = marker.get("estimate") or summary.get("estimate") or {}
        return {
            "name": name, "status": status, "step": int(step), "total_steps": total,
            "progress": min(step / total, 1.0) if total else None,
            "eta_s": (total - step) * mean_step if total and mean_step and status == "running" else None,
            "measured_s_per_step": mean_step, "estimated_s_per_step": estimate.get("seconds_per_step"),
            "estimated_peak_gib": estimate.get("peak_gib"), "measured_peak_gib": (summary.get("estimate") or {}).get("measured_peak_gib"),
            "device": marker.get("device"), "started": marker.get("started"), "launched_here": bool(record.get("overrides")),
            "can_resume": bool(record.get("overrides")) and not alive and status != "finished" and (folder / "checkpoints" / "latest").is_file(),
            "returncode": returncode, "error": self._last_error(folder) if status == "failed" else None,
        }  # fmt: skip

    @staticmethod
    def _last_error(folder: Path) -> str | None:
        """The error paragraph of a failed run's log (``error: ...``), else its last lines."""
        try:
            lines = (folder / LOG_FILE).read_text(errors="replace").splitlines()
        except OSError:
            return None
        errors = [line for line in lines if line.startswith("error: ")]
        return errors[-1][len("error: "):] if errors else "\n".join(lines[-5:]) or None

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join((self.folder(name) / LOG_FILE).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def metrics(self, name: str) -> dict:
        return read_metrics(self.folder(name) / "metrics.csv")

    def config(self, name: str) -> dict:
        from omegaconf import OmegaConf

        path = self.folder(name) / "config.yaml"
        try:
            return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else {}
        except Exception:  # a config that does not parse is shown as missing, not a crash of the page
            return {}

    def compare(self, names: list[str]) -> dict:
        """The config keys whose values differ between the runs, and each run's final numbers."""
        configs = {name: flatten(self.config(name)) for name in names}
        keys = sorted({key for flat in configs.values() for key in flat} - {"output_dir"})
        differences = [{"key": key, "values": {name: configs[name].get(key) for name in names}} for key in keys
                       if len({json.dumps(configs[name].get(key), sort_keys=True, default=str) for name in names}) > 1]  # fmt: skip
        finals = {}
        for name in names:
            summary = _read_json(self.folder(name) / "summary.json")
            last = {key: points[-1][1] for key, points in self.metrics(name).items() if key in FINAL_METRICS}
            finals[name] = {**last, "status": self.status(name)["status"], "steps": summary.get("global_step"),
                            "train_seconds": summary.get("train_seconds"), "tokens_per_s": summary.get("tokens_per_s")}  # fmt: skip
        return {"runs": names, "differences": differences, "finals": finals}


FINAL_METRICS = ("train/loss", "val/loss", "val/perplexity", "val/accuracy", "val/reward_accuracy", "train/tokens_per_s")
