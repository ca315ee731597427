"""The board's chat: a run's base model and its trained model answer the same prompt, side by side.

Both are served by ``tunelab serve`` processes the board starts on free local ports the first
time a run is chatted with: one process for an adapter run (the base, and the adapter as the model
``tuned``), two for a full fine-tune (the base, and the run's checkpoint). They are restarted when
the run writes a newer checkpoint, and stopped with the board.
"""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError, UsageError


def base_spec(run_folder: Path) -> str:
    """What ``tunelab serve --model`` takes for the model a run started from: the model pool's
    ``model_path``, or the name of the shipped pool the run's ``config.yaml`` was built from."""
    from omegaconf import OmegaConf

    from tunelab.config import CONFIG_DIR

    config = run_folder / "config.yaml"
    if not config.is_file():
        raise UsageError(f"{run_folder} has no config.yaml yet: chat needs a run that has started training.")
    pool = OmegaConf.to_container(OmegaConf.load(config).get("modelpool") or {}, resolve=False)
    if pool.get("model_path"):
        return str(pool["model_path"])
    for path in sorted((Path(CONFIG_DIR) / "modelpool" / "CausalLMPool").glob("*.yaml")):
        shipped = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if {k: v for k, v in shipped.items() if k != "quantization"} == {k: v for k, v in pool.items() if k != "quantization"}:
            return path.stem
    raise UsageError(
        f"The model pool of {run_folder.name} has no model_path and is none of the shipped pools, so its base cannot be served: "
        "chat needs a base the server can load (a model folder, a .gguf file or a shipped pool)."
    )


def tuned_checkpoint(run_folder: Path) -> tuple[Path, str]:
    """The run's newest loadable checkpoint and its kind (``adapter`` or ``model``)."""
    from tunelab.evaluation.models import _adapter_folder, _run_checkpoint

    checkpoint = _run_checkpoint(run_folder)
    if checkpoint is None:
        raise UsageError(f"{run_folder.name} has written no checkpoint yet: chat once it has one (a stopped run writes one).")
    if _adapter_folder(checkpoint):
        return checkpoint, "adapter"
    if (checkpoint / "config.json").is_file():
        return checkpoint, "model"
    raise UsageError(
        f"{run_folder.name}'s checkpoint {checkpoint.name} is in Lightning's format (method.save_ckpt_type=lightning), which only "
        "`tunelab train` resumes from. Launch runs with the checkpoint format hf (peft for adapters) to chat with them."
    )


def random_base_note(base: str) -> str | None:
    """What to say when the base is a shipped pool built from a bare config (random weights)."""
    if "/" in base or base.endswith(".gguf"):
        return None
    from tunelab.evaluation.models import _shipped_pool

    if getattr(_shipped_pool(base), "model_path", None) is not None:
        return None
    return f"{base} is built from a config with random weights: the base shown is one random draw, not the weights this run started from."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-5:])
                raise TunelabError(f"tunelab serve stopped before it answered (exit {self.process.returncode}): {tail}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        raise TunelabError(f"tunelab serve did not answer at {self.url} within {timeout:.0f} s (its log: {self.log}).")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class ChatPair:
    checkpoint: Path
    base_model: str  # what the base server loads (tunelab serve --model)
    base_note: str | None  # said beside the answers: a random-init base is not the run's start
    base: tuple[Server, str]  # the server, and the model name to ask it for
    tuned: tuple[Server, str]
    servers: list[Server] = field(default_factory=list)


class ChatServers:
    """The serve processes of the runs chatted with, one pair of models per run."""

    def __init__(self, python: str = sys.executable, startup_seconds: float = 300.0):
        self.python = python
        self.startup_seconds = startup_seconds
        self.pairs: dict[str, ChatPair] = {}
        self.lock = threading.Lock()

    def _serve(self, model: str, name: str, log: Path, adapters: list[str] = ()) -> Server:
        port = free_port()
        command = [self.python, "-m", "tunelab", "serve", "--model", model, "--name", name, "--port", str(port), "--host", "127.0.0.1"]
        for adapter in adapters:
            command += ["--adapter", adapter]
        handle = open(log, "ab")
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        handle.close()
        return Server(process, f"http://127.0.0.1:{port}/v1", log)

    def pair(self, run_folder: Path) -> ChatPair:
        """Start (or reuse) the servers for a run's base and its newest checkpoint."""
        checkpoint, kind = tuned_checkpoint(run_folder)
        with self.lock:
            current = self.pairs.get(run_folder.name)
            if current is not None and current.checkpoint == checkpoint and all(s.process.poll() is None for s in current.servers):
                return current
            if current is not None:
                for server in current.servers:
                    server.stop()
            base = base_spec(run_folder)
            log = run_folder / "chat-serve.log"
            if kind == "adapter":
                server = self._serve(base, "base", log, [f"tuned={checkpoint}"])
                pair = ChatPair(checkpoint, base, random_base_note(base), (server, "base"), (server, "tuned"), [server])
            else:
                base_server, tuned_server = self._serve(base, "base", log), self._serve(str(checkpoint), "tuned", log)
                pair = ChatPair(checkpoint, base, random_base_note(base), (base_server, "base"), (tuned_server, "tuned"), [base_server, tuned_server])
            try:
                for server in pair.servers:
                    server.wait_ready(self.startup_seconds)
            except TunelabError:
                for server in pair.servers:
                    server.stop()
                raise
            self.pairs[run_folder.name] = pair
            return pair

    def ask(self, run_folder: Path, prompt: str, max_tokens: int = 128, temperature: float = 0.0) -> dict:
        """Both models' answers to one user message (the chat template of the base applies)."""
        if not prompt.strip():
            raise UsageError("Write a prompt first.")
        pair = self.pair(run_folder)
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": temperature}

        def complete(target: tuple[Server, str]) -> dict:
            server, model = target
            request = urllib.request.Request(server.url + "/chat/completions", data=json.dumps({**body, "model": model}).encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=600) as response:
                    answer = json.loads(response.read())
            except urllib.error.HTTPError as err:
                return {"error": f"HTTP {err.code}: {err.read().decode(errors='replace')[:500]}"}
            choice = answer["choices"][0]
            return {"text": choice["message"]["content"], "finish_reason": choice.get("finish_reason"),
                    "tokens": answer.get("usage", {}).get("completion_tokens"), "seconds": time.perf_counter() - started}  # fmt: skip

        with ThreadPoolExecutor(2) as pool:
            base, tuned = pool.map(complete, (pair.base, pair.tuned))
        return {"run": run_folder.name, "checkpoint": str(pair.checkpoint), "base_model": pair.base_model, "base_note": pair.base_note, "base": base, "tuned": tuned}

    def close(self) -> None:
        with self.lock:
            for pair in self.pairs.values():
                for server in pair.servers:
                    server.stop()
            self.pairs.clear()
