"""``tunelab serve``: one base model and its LoRA (any peft) adapters behind an OpenAI-compatible
HTTP API (FastAPI and uvicorn).

A request names the base or an adapter in its ``model`` field. Requests wait in one bounded queue
(full: 503 with Retry-After). One worker thread owns the model and decodes a running batch
(``tunelab.deploy.batching``): before every step, waiting requests that can be decoded with the
rows there join it (up to ``max_batch`` rows), and a row leaves as soon as it ends, so a request
waits for one step, not for a whole batch. Every new token goes to its request as it is decoded, so
streaming is real. Requests with the same sampling settings share the batch whatever they ask for,
the base or plain LoRA adapters (peft's mixed-adapter batches: each row goes through its own
adapter's low-rank update); other adapter kinds (DoRA, IA3, ...) share it with requests for the
same adapter only.
Adapters load at start, on ``POST /v1/adapters`` or on first use (from the allowed folders only),
at most ``max_resident`` at once, the least recently used unloaded first.

    server = ModelServer(load_eval_model("smollm2-135m"), adapters={"gsm8k": "runs/gsm8k/checkpoints/step-000060"})
    uvicorn.run(create_app(server), host="127.0.0.1", port=8000)
"""

import asyncio
import json
import math
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.errors import TunelabError


class ServeError(Exception):
    """An error the API answers with: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}


@dataclass
class Job:
    """One request's generation: what to decode, and where its tokens go."""

    model: str  # the base's name or an adapter's
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    cancelled: bool = False  # nobody waits for it any more (timed out, or the client went away)
    stream: bool = True  # False: its tokens are not sent one by one (the answer comes whole), only the end
    queued: float = field(default_factory=time.perf_counter)

    def settings(self) -> tuple:
        return (self.temperature, self.top_p)

    def send(self, event: tuple) -> None:
        if event[0] == "token" and not self.stream:  # every wake-up of the event loop costs the decoding thread the GIL
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the request's event loop is gone (the server is stopping): nobody waits for it
            pass


@dataclass
class Routed:
    """A request's way through the server: the model it named, the variant its route chose (the
    same name without a route), the served model that decodes it, who asked, when, its id."""

    requested: str
    variant: str
    model: str
    user: str | None
    ident: str
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Limits:
    max_batch: int = 8
    queue_size: int = 64
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    max_resident: int = 4
    request_seconds: float = 300.0


class ModelServer:
    """The model, its adapters and the worker that decodes batches."""

    def __init__(self, local, adapters: dict[str, str] | None = None, adapter_dirs: list[str] | None = None, limits: Limits | None = None,
                 name: str | None = None, registry=None, routes: dict[str, list[tuple[str, float]]] | None = None, ab_log: str | None = None,
                 mixed_lora: str = "stacked"):  # fmt: skip
        self.local, self.tokenizer, self.registry = local, local.tokenizer, registry
        self.routes = dict(routes or {})  # name -> [(variant, weight)]: A/B and canary splits
        self.variants: dict[tuple[str, str], dict] = {}  # (route, variant) -> requests, tokens, seconds, feedback, outcome
        self.answered: OrderedDict[str, tuple[str, str]] = OrderedDict()  # a routed answer's id -> (route, variant), for feedback
        self.ab_log, self.log_lock = (Path(ab_log) if ab_log else None), threading.Lock()
        if self.ab_log is not None:
            self.ab_log.parent.mkdir(parents=True, exist_ok=True)
        self.base, self.name = local.model, name or Path(str(local.name)).name
        self.limits = limits or Limits()
        self.adapter_dirs = [Path(d).resolve() for d in (adapter_dirs or [])]
        self.known: dict[str, Path] = {}  # adapter name -> folder (loaded on first use when not resident)
        self.mixable: set[str] = set()  # plain LoRA adapters: they share batches with the base and each other
        self.resident: OrderedDict[str, Path] = OrderedDict()  # least recently used first
        self.peft = None
        self.lock = threading.Lock()  # the model: loading adapters and decoding never overlap
        self.wanting = 0  # threads waiting for the lock: the worker lets them in between steps
        self.in_use: set[str] = set()  # the models of the running batch (never evicted)
        self.setup = self.setup_key = None  # the worker's model setup for its rows (see _prepare_rows)
        self.row_adapters: list[str] = []  # each row's adapter, read by peft's mixed-batch hooks
        self.stacked = None  # the StackedLoRA of the mixed setup
        if mixed_lora not in ("stacked", "peft"):
            raise TunelabError(f"mixed_lora={mixed_lora!r}: choose stacked (tunelab's, the default) or peft (peft's mixed-adapter batches).")
        self.mixed_lora = mixed_lora
        self.jobs: "queue.Queue[Job]" = queue.Queue(maxsize=self.limits.queue_size)
        self.waiting: deque[Job] = deque()  # taken from the queue, not yet batched
        # steps: decoding steps; step_rows: rows over all steps (/ steps: the mean batch); mixed_steps: steps with more than one model
        self.counts = {"requests": 0, "steps": 0, "step_rows": 0, "mixed_steps": 0, "largest_batch": 0, "completion_tokens": 0,
                       "prefill_seconds": 0.0, "decode_seconds": 0.0}  # time in prompts' forward passes, and in decoding steps
        for adapter, path in (adapters or {}).items():
            self.add_adapter(adapter, path, trusted=True)
        for route, variants in self.routes.items():
            unknown = [v for v, _ in variants if "@" not in v and v != self.name and v not in self.known]
            if unknown or route == self.name or route in self.known:
                raise TunelabError(f"--route {route}: {'its variants ' + ', '.join(unknown) + ' are not served' if unknown else 'the name is taken by a model'} "
                                   f"(variants: the base {self.name!r}, an --adapter name, or with --registry-url a reference like name@production).")  # fmt: skip
        from tunelab.deploy.batching import supports_running_batches

        if not supports_running_batches(self.base):
            raise TunelabError(f"tunelab serve decodes requests in one running batch whose key/value cache it regroups as requests come and go; "
                               f"that needs every layer to attend to the whole sequence, and {self.name} has sliding-window layers.")  # fmt: skip
        self.worker = threading.Thread(target=self._work, name="tunelab-serve-worker", daemon=True)
        self.worker.start()

    # ----------------------------------------------------------------------------- adapters

    def models(self) -> list[str]:
        """What requests may name: the base, the adapters, the routes, and with a registry each
        name's production and staging versions."""
        staged = []
        if self.registry is not None:
            staged = [f"{v.name}@{v.stage}" for v in self.registry.list_versions() if v.stage in ("production", "staging")]
        return [self.name, *[k for k in self.known if "@v" not in k], *self.routes, *staged]

    def route(self, name: str, user: str | None) -> str:
        """The variant a request for ``name`` goes to: by weight, the same for every request of one
        ``user`` (a hash of the name and the user), random without one; ``name`` itself when it is
        not a route."""
        import hashlib
        import random

        variants = self.routes.get(name)
        if not variants:
            return name
        total = sum(weight for _, weight in variants)
        if user:
            point = int.from_bytes(hashlib.sha256(f"{name}\0{user}".encode()).digest()[:8], "big") / 2**64 * total
        else:
            point = random.random() * total
        for variant, weight in variants:
            point -= weight
            if point < 0:
                return variant
        return variants[-1][0]

    def record(self, call: Routed, job: Job) -> None:
        """Count a routed request's answer for its variant, keep its id for feedback, and write it to
        the A/B log (one JSON line: route, variant, served model, user, tokens, latency, finish)."""
        if call.requested not in self.routes:
            return
        seconds = time.perf_counter() - call.started
        counts = self.variants.setdefault((call.requested, call.variant), {"requests": 0, "completion_tokens": 0, "seconds": 0.0, "feedback": 0, "outcome": 0.0})
        counts["requests"] += 1
        counts["completion_tokens"] += len(job.tokens)
        counts["seconds"] += seconds
        self.answered[call.ident] = (call.requested, call.variant)
        while len(self.answered) > 100_000:  # feedback comes soon after an answer, or not at all
            self.answered.popitem(last=False)
        self._log({"id": call.ident, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "route": call.requested, "variant": call.variant,
                   "model": call.model, "user": call.user, "completion_tokens": len(job.tokens), "latency_s": round(seconds, 4), "finish": job.finish})  # fmt: skip

    def feedback(self, ident: str, outcome: float) -> dict:
        """A user's outcome for an answer (1/0 for good/bad, or a score), counted for its variant
        and written to the A/B log, where ``tunelab eval ab LOG --outcome outcome`` reads it."""
        if ident not in self.answered:
            raise ServeError(404, f"no routed answer with id {ident!r} (feedback is taken for answers of --route names, by the id of the response)",
                             code="not_found")  # fmt: skip
        route, variant = self.answered[ident]
        counts = self.variants[(route, variant)]
        counts["feedback"] += 1
        counts["outcome"] += outcome
        row = {"id": ident, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "route": route, "variant": variant, "outcome": outcome}
        self._log(row)
        return row

    def _log(self, row: dict) -> None:
        if self.ab_log is not None:
            with self.log_lock, self.ab_log.open("a", encoding="utf-8") as log:
                log.write(json.dumps(row) + "\n")

    def add_adapter(self, name: str, path: str, trusted: bool = False) -> None:
        """Know ``name`` as the adapter in ``path`` and load it now (within the allowed folders
        unless given at start)."""
        if not name or name == self.name or "/" in name:
            raise ServeError(400, f"adapter name {name!r} is taken by the base or not a plain name")
        folder = Path(path).expanduser().resolve()
        if not trusted and not any(folder == d or d in folder.parents for d in self.adapter_dirs):
            allowed = ", ".join(str(d) for d in self.adapter_dirs) or "none (start the server with --adapter-dir DIR)"
            raise ServeError(403, f"adapter path {path!r} is outside the folders adapters may be loaded from: {allowed}", "permission_error")
        if not (folder / "adapter_config.json").is_file():
            raise ServeError(400, f"{path!r} holds no adapter_config.json: give a peft adapter folder (what tunelab saves with save_ckpt_type=peft)")
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
        except ValueError as err:
            raise ServeError(400, f"{folder / 'adapter_config.json'} is not valid JSON: {err}") from None
        with self._model_lock():
            self.known[name] = folder
            self._load(name)
            # peft mixes adapters in one batch for LoRA only, and not with DoRA's magnitude vectors
            self.mixable.discard(name)
            if config.get("peft_type") == "LORA" and not config.get("use_dora"):
                self.mixable.add(name)

    def remove_adapter(self, name: str) -> None:
        if name not in self.known:
            raise ServeError(404, f"no adapter named {name!r}; loaded: {', '.join(self.known) or 'none'}", code="model_not_found")
        with self._model_lock():
            if name in self.in_use:
                raise ServeError(409, f"adapter {name!r} is decoding requests now; unload it when they have finished", code="adapter_in_use")
            if name in self.resident:
                self.peft.delete_adapter(name)
                del self.resident[name]
            del self.known[name]
            self.mixable.discard(name)

    def _model_lock(self):
        """The model's lock for a thread other than the worker, which lets it in between two steps."""
        import contextlib

        @contextlib.contextmanager
        def held():
            self.wanting += 1
            try:
                with self.lock:
                    self._release_setup()
                    yield
            finally:
                self.wanting -= 1

        return held()

    def _load(self, name: str) -> None:
        """Make ``name`` resident (the lock held)."""
        from peft import PeftModel

        if name in self.resident:
            self.resident.move_to_end(name)
            return
        while len(self.resident) >= self.limits.max_resident:
            evicted = next((a for a in self.resident if a not in self.in_use), None)
            if evicted is None:
                raise ServeError(503, f"all {self.limits.max_resident} resident adapters are decoding requests now; retry shortly", "server_error",
                                 headers={"Retry-After": "1"})  # fmt: skip
            del self.resident[evicted]
            self.peft.delete_adapter(evicted)
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(self.known[name]), adapter_name=name).eval()
            else:
                self.peft.load_adapter(str(self.known[name]), adapter_name=name)
        except (RuntimeError, ValueError, OSError) as err:
            folder = self.known.pop(name)
            self.mixable.discard(name)
            raise ServeError(400, f"adapter {name!r} at {folder} does not load on {self.name}: {str(err).splitlines()[0]}") from None
        self.resident[name] = self.known[name]

    def _model_for(self, name: str):
        """The module to decode with for ``name`` (the lock held) and a context that sets it up."""
        import contextlib

        if name == self.name:
            if self.peft is None:
                return self.base, contextlib.nullcontext()
            return self.peft, self.peft.disable_adapter()
        self._load(name)
        self.peft.set_adapter(name)
        return self.peft, contextlib.nullcontext()

    # ----------------------------------------------------------------------------- requests

    def check_model(self, name: str) -> str:
        """The served model a request's ``model`` names: the base, an adapter, or with a registry a
        reference (``name@production``, ``name@staging``, ``name@3``), looked up at every request so
        that a promotion or rollback changes what it serves without a restart."""
        if name == self.name or name in self.known:
            return name
        if self.registry is not None and "@" in name:
            return self._registered(name)
        raise ServeError(404, f"The model {name!r} does not exist; served: {', '.join(self.models())}", code="model_not_found")

    def _registered(self, ref: str) -> str:
        try:
            version = self.registry.resolve(ref)
        except TunelabError as err:
            raise ServeError(404, str(err), code="model_not_found") from None
        folder = Path(version.path)
        if version.kind == "run":  # the run's final checkpoint
            summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
            folder = Path(summary.get("final_checkpoint") or folder)
        if not (folder / "adapter_config.json").is_file():
            raise ServeError(400, f"{ref} is {version.ref}, a whole model at {folder}, not an adapter of {self.name}: serve it with tunelab serve --model")
        internal = f"{version.name}@v{version.version}"
        if internal not in self.known:
            self.add_adapter(internal, str(folder), trusted=True)  # a registered version is trusted like --adapter
        return internal

    def submit(self, job: Job) -> None:
        if len(job.prompt) > self.limits.max_prompt_tokens:
            raise ServeError(400, f"the prompt has {len(job.prompt)} tokens; this server takes at most {self.limits.max_prompt_tokens}", code="context_length_exceeded")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ServeError(503, f"the server is busy ({self.limits.queue_size} requests waiting); retry shortly", "server_error",
                             headers={"Retry-After": "1"}) from None  # fmt: skip
        self.counts["requests"] += 1

    def _shares_batches(self, model: str) -> bool:
        return model == self.name or model in self.mixable

    def _fits(self, models: set[str]) -> bool:
        """Whether requests for ``models`` can be decoded in one batch."""
        if len(models) == 1:
            return True
        return all(self._shares_batches(m) for m in models) and len(models - {self.name}) <= self.limits.max_resident

    def _joining(self, rows: list[Job]) -> list[Job]:
        """The waiting requests that join a batch of ``rows`` now, in the order they came: the same
        sampling settings as the batch, models that can share it, up to ``max_batch`` rows. The
        first waiting request that cannot join ends the list, so that nothing overtakes it: the
        batch drains, and the next one starts from it. With no rows, it waits for a request and
        starts from it."""
        joining = [] if rows else [self.waiting.popleft() if self.waiting else self.jobs.get()]
        while True:  # everything waiting now
            try:
                self.waiting.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        reference = (rows or joining)[0]
        models = {j.model for j in rows + joining}
        for other in list(self.waiting):
            if len(rows) + len(joining) >= self.limits.max_batch:
                break
            if other.cancelled:
                self.waiting.remove(other)
            elif other.settings() == reference.settings() and self._fits(models | {other.model}):
                self.waiting.remove(other)
                joining.append(other)
                models.add(other.model)
            else:
                break
        return [j for j in joining if not j.cancelled]

    def _prepare_rows(self, jobs: list[Job]) -> None:
        """Set the model up for these rows (the lock held): each row's adapter, or the base.

        Rows for different plain LoRA adapters (and the base) take each its own update: by default
        through ``StackedLoRA`` (the resident adapters' matrices stacked, two products a layer),
        with ``mixed_lora="peft"`` through peft's mixed-adapter batches (the hooks its
        ``generate(adapter_names=...)`` registers, reading the row list rewritten before every
        forward pass). Once mixed, the setup stays mixed for every batch of plain LoRA rows, so
        rows can come and go without setting it up again. A batch of one model otherwise has that
        adapter set (or the adapters disabled for the base). The setup stays from one forward pass
        to the next (``set_adapter`` and hooks cost tens of milliseconds, as much as a decoding
        step); another thread that takes the model undoes it first (``_model_lock``)."""
        import contextlib

        from tunelab.deploy.mixed_lora import StackedLoRA, stackable

        models = [j.model for j in jobs]
        adapters = list(dict.fromkeys(m for m in models if m != self.name))
        for adapter in adapters:
            self._load(adapter)  # at most max_resident of them (see _joining): none evicts another
        sticky = self.setup_key is not None and self.setup_key[0] == "mixed"
        mixed = self.peft is not None and all(self._shares_batches(m) for m in models) and (len(set(models)) > 1 or sticky)
        if mixed:
            # the adapters a setup covers: all the resident plain LoRA ones (a new one wraps layers the setup may not know)
            covered = tuple(a for a in self.resident if a in self.mixable)
            if sticky and self.setup_key[2] == covered:
                key = self.setup_key  # (stackable() reads every module: not at every forward pass)
            else:
                key = ("mixed", "stacked" if self.mixed_lora == "stacked" and stackable(self.peft, list(covered)) else "peft", covered)
        else:
            key = ("single", models[0])
        if key != self.setup_key:
            self._release_setup()
            stack = contextlib.ExitStack()
            if key[:2] == ("mixed", "stacked"):
                stack.enter_context(self.peft.disable_adapter())
                self.stacked = stack.enter_context(StackedLoRA(self.peft, list(covered)))
            elif mixed:
                self.row_adapters = []
                stack.enter_context(self.peft._enable_peft_forward_hooks(adapter_names=self.row_adapters))
            else:
                stack.enter_context(self._model_for(models[0])[1])
            self.setup, self.setup_key = stack, key
        if key[:2] == ("mixed", "stacked"):
            self.stacked.set_rows([None if m == self.name else m for m in models])
        elif mixed:
            self.row_adapters[:] = ["__base__" if m == self.name else m for m in models]

    def _release_setup(self) -> None:
        if self.setup is not None:
            self.setup.close()
        self.setup = self.setup_key = None

    @staticmethod
    def _fail(jobs: list[Job], err: Exception) -> None:
        if not isinstance(err, ServeError):
            err = ServeError(500, f"generation failed: {type(err).__name__}: {err}", "server_error")
        for job in jobs:
            job.finish = "error"
            job.send(("error", err))

    def _work(self) -> None:
        from tunelab.deploy.batching import RunningBatch
        from tunelab.evaluation.models import _eos_ids

        eos = _eos_ids(self.base, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        running = None
        while True:
            joining = self._joining(running.rows if running else [])
            if not joining and (running is None or not running.rows):
                continue
            while self.wanting:  # adapters to load, log-probabilities to score: between two steps
                time.sleep(0.0005)
            try:
                with self.lock:
                    if joining and (running is None or not running.rows):
                        running = RunningBatch(self.base, eos, pad, joining[0].temperature, joining[0].top_p, self._prepare_rows)
                    self.in_use = {j.model for j in running.block + joining}  # ended rows still in the block too
                    began = time.perf_counter()
                    if joining:
                        try:
                            running.join(joining)
                        except Exception as err:  # noqa: BLE001 - the joining requests fail; the rows decoding go on
                            self._release_setup()
                            self._fail(joining, err)
                            joining = []
                    joined = time.perf_counter()
                    for job in running.rows:
                        if job.cancelled:
                            job.finish = "cancelled"
                    rows = running.rows
                    tokens = sum(len(j.tokens) for j in rows)
                    running.step()
                    self.in_use = {j.model for j in running.block}
            except Exception as err:  # noqa: BLE001 - a failed step answers its requests and the server goes on
                with self.lock:
                    self._release_setup()
                failed = running.fail() if running else []
                self._fail(failed + [j for j in joining if all(j is not f for f in failed)], err)
                self.in_use = set()
                continue
            self.counts["prefill_seconds"] += joined - began
            self.counts["decode_seconds"] += time.perf_counter() - joined
            self.counts["steps"] += 1
            self.counts["step_rows"] += len(rows)
            self.counts["mixed_steps"] += len({j.model for j in rows}) > 1
            self.counts["largest_batch"] = max(self.counts["largest_batch"], len(rows))
            self.counts["completion_tokens"] += sum(len(j.tokens) for j in rows) - tokens

    def token_logprobs(self, model_name: str, tokens: list[int], top: int) -> tuple[list[float | None], list[dict | None]]:
        """Each token's log-probability given those before it (the first: None), and the ``top``
        most likely tokens at each position, under ``model_name``."""
        with self._model_lock():
            model, context = self._model_for(model_name)
            device = next(model.parameters()).device
            with context, torch.no_grad():
                logits = model(input_ids=torch.tensor([tokens], device=device)).logits[0].float()
        log_probs = logits.log_softmax(-1)
        values: list[float | None] = [None] + [float(log_probs[k - 1, t]) for k, t in enumerate(tokens) if k > 0]
        tops: list[dict | None] = [None]
        for k in range(1, len(tokens)):
            best = torch.topk(log_probs[k - 1], top) if top else None
            tops.append({self.tokenizer.decode([int(i)]): float(v) for v, i in zip(best.values, best.indices)} if best is not None else None)
        return values, tops


# ----------------------------------------------------------------------------- the HTTP API


def create_app(server: ModelServer, api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None)

    @app.exception_handler(ServeError)
    async def _serve_error(_request, err: ServeError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        try:
            if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
                raise ServeError(401, "Missing or wrong API key: send Authorization: Bearer KEY.", "authentication_error", "invalid_api_key")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > server.limits.max_body_bytes:
                raise ServeError(413, f"the request body has {size} bytes; this server takes at most {server.limits.max_body_bytes}")
        except ServeError as err:
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        return await call_next(request)

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError as err:
            raise ServeError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise ServeError(400, "the request body must be a JSON object")
        return body

    def settings(body: dict) -> tuple[int, float, float]:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 256))
        temperature, top_p = body.get("temperature", 1.0), body.get("top_p", 1.0)
        if not isinstance(max_tokens, int) or max_tokens < 0 or max_tokens > server.limits.max_tokens:
            raise ServeError(400, f"max_tokens must be an integer from 0 to {server.limits.max_tokens}", code="invalid_value")
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ServeError(400, "temperature must be a number from 0 to 2", code="invalid_value")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ServeError(400, "top_p must be a number in (0, 1]", code="invalid_value")
        if body.get("n", 1) != 1:
            raise ServeError(400, "n must be 1 on this server", code="invalid_value")
        return max_tokens, float(temperature), float(top_p)

    async def run(model: str, prompt: list[int], max_tokens: int, temperature: float, top_p: float, stream: bool = False) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(model, prompt, max_tokens, temperature, top_p, loop, asyncio.Queue(), stream=stream)
        if max_tokens == 0:
            job.finish = "length"
            job.send(("done", "length"))
            return job
        server.submit(job)
        return job

    async def events(job: Job):
        deadline = time.monotonic() + server.limits.request_seconds
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                job.cancelled = True
                raise ServeError(504, f"the request ran past {server.limits.request_seconds:g} s", "server_error") from None
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return

    async def target(request: Request, body: dict, prefix: str) -> Routed:
        """The model a request names, the variant its route sends it to, the served model that
        decodes it."""
        requested, user = str(body.get("model", "")), body.get("user") or request.headers.get("x-tunelab-user")
        variant = server.route(requested, user)
        model = await asyncio.to_thread(server.check_model, variant)
        return Routed(requested, variant, model, user, f"{prefix}-{uuid.uuid4().hex[:24]}")

    def headers(call: Routed) -> dict:
        return {"X-Tunelab-Variant": call.variant, "X-Tunelab-Model": call.model}

    def usage(job: Job) -> dict:
        return {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.tokens), "total_tokens": len(job.prompt) + len(job.tokens)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "tunelab"} for m in server.models()]}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        body = await body_of(request)
        if not isinstance(body.get("name"), str) or not isinstance(body.get("path"), str):
            raise ServeError(400, 'give {"name": NAME, "path": FOLDER}')
        await asyncio.to_thread(server.add_adapter, body["name"], body["path"])
        return {"loaded": body["name"], "models": server.models()}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        await asyncio.to_thread(server.remove_adapter, name)
        return {"unloaded": name, "models": server.models()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        from tunelab.data import render

        body = await body_of(request)
        call = await target(request, body, "chatcmpl")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ServeError(400, "messages must be a non-empty list of {role, content}", code="invalid_value")
        max_tokens, temperature, top_p = settings(body)
        text = render(server.tokenizer, [{"role": m["role"], "content": str(m["content"])} for m in messages], add_generation_prompt=True)
        job = await run(call.model, server.tokenizer(text, add_special_tokens=False)["input_ids"], max_tokens, temperature, top_p, bool(body.get("stream")))
        created = int(time.time())
        if body.get("stream"):
            return StreamingResponse(stream_chat(job, call, created, bool((body.get("stream_options") or {}).get("include_usage"))),
                                     media_type="text/event-stream", headers=headers(call))  # fmt: skip
        async for _ in events(job):
            pass
        server.record(call, job)
        content = server.tokenizer.decode(job.tokens, skip_special_tokens=True)
        return JSONResponse({"id": call.ident, "object": "chat.completion", "created": created, "model": call.requested,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": job.finish}],
                             "usage": usage(job)}, headers=headers(call))  # fmt: skip

    async def stream_chat(job: Job, call: Routed, created: int, include_usage: bool):
        ident, model = call.ident, call.requested

        def chunk(delta: dict, finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"  # fmt: skip

        yield chunk({"role": "assistant", "content": ""})
        shown = ""
        try:
            async for kind, _value in events(job):
                if kind == "token":
                    text = server.tokenizer.decode(job.tokens, skip_special_tokens=True)
                    if not text.endswith("\ufffd"):  # a character still incomplete waits for its next bytes
                        yield chunk({"content": text[len(shown) :]})
                        shown = text
            text = server.tokenizer.decode(job.tokens, skip_special_tokens=True)
            if text != shown:
                yield chunk({"content": text[len(shown) :]})
            yield chunk({}, job.finish)
            server.record(call, job)
            if include_usage:
                yield "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                                             "choices": [], "usage": usage(job)}) + "\n\n"  # fmt: skip
        except ServeError as err:
            yield "data: " + json.dumps(err.body()) + "\n\n"
        finally:
            job.cancelled = job.finish is None  # the client went away: its row leaves the batch
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        call = await target(request, body, "cmpl")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ServeError(400, "prompt must be a string (one prompt per request on this server)", code="invalid_value")
        if body.get("stream"):
            raise ServeError(400, "stream is available on /v1/chat/completions; /v1/completions answers whole", code="invalid_value")
        max_tokens, temperature, top_p = settings(body)
        logprobs, echo = body.get("logprobs"), bool(body.get("echo", False))
        if logprobs is not None and (not isinstance(logprobs, int) or not 0 <= logprobs <= 20):
            raise ServeError(400, "logprobs must be an integer from 0 to 20", code="invalid_value")
        prompt_ids = server.tokenizer(prompt)["input_ids"]
        job = await run(call.model, prompt_ids, max_tokens, temperature, top_p)
        async for _ in events(job):
            pass
        server.record(call, job)
        completion = server.tokenizer.decode(job.tokens, skip_special_tokens=True)
        choice = {"index": 0, "text": (prompt if echo else "") + completion, "logprobs": None, "finish_reason": job.finish}
        if logprobs is not None:
            scored = prompt_ids + job.tokens
            values, tops = await asyncio.to_thread(server.token_logprobs, call.model, scored, logprobs)
            start = 0 if echo else len(prompt_ids)
            pieces = [server.tokenizer.decode([t]) for t in scored]
            offsets, position = [], 0
            for piece in pieces:
                offsets.append(position)
                position += len(piece)
            choice["logprobs"] = {"tokens": pieces[start:], "token_logprobs": values[start:], "top_logprobs": tops[start:],
                                  "text_offset": [o - (offsets[start] if start < len(offsets) else 0) for o in offsets[start:]]}  # fmt: skip
        return JSONResponse({"id": call.ident, "object": "text_completion", "created": int(time.time()), "model": call.requested,
                             "choices": [choice], "usage": usage(job)}, headers=headers(call))  # fmt: skip

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        body = await body_of(request)
        outcome = body.get("outcome")
        if not isinstance(body.get("id"), str) or not isinstance(outcome, (int, float)) or not math.isfinite(outcome):
            raise ServeError(400, 'give {"id": RESPONSE_ID, "outcome": 1 or 0 (good or bad) or a score}', code="invalid_value")
        return server.feedback(body["id"], float(outcome))

    @app.get("/metrics")
    async def metrics():
        from fastapi.responses import PlainTextResponse

        lines = [f"tunelab_{key}_total {value}" for key, value in server.counts.items() if key != "largest_batch"]
        lines.append(f"tunelab_largest_batch {server.counts['largest_batch']}")
        for (route, variant), counts in sorted(server.variants.items()):
            labels = f'{{route="{route}",variant="{variant}"}}'
            lines += [f"tunelab_variant_requests_total{labels} {counts['requests']}",
                      f"tunelab_variant_completion_tokens_total{labels} {counts['completion_tokens']}",
                      f"tunelab_variant_latency_seconds_sum{labels} {counts['seconds']:.6f}",
                      f"tunelab_variant_feedback_total{labels} {counts['feedback']}",
                      f"tunelab_variant_outcome_sum{labels} {counts['outcome']:g}"]  # fmt: skip
        lines.append(f"tunelab_queue_waiting {server.jobs.qsize() + len(server.waiting)}")
        return PlainTextResponse("\n".join(lines) + "\n")

    return app


def parse_routes(specs: list[str]) -> dict[str, list[tuple[str, float]]]:
    """``NAME=VARIANT:WEIGHT,VARIANT:WEIGHT`` flags as a dict (weights need not sum to 1)."""
    routes = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        variants = []
        for part in rest.split(",") if sep else []:
            variant, _, weight = part.rpartition(":")
            try:
                variants.append((variant, float(weight)))
            except ValueError:
                variants = []
                break
        if not name or not variants or any(not v or w <= 0 for v, w in variants):
            raise TunelabError(f"--route {spec!r}: write NAME=VARIANT:WEIGHT,VARIANT:WEIGHT with positive weights (e.g. chat=gsm8k@production:0.9,gsm8k@staging:0.1).")
        routes[name] = variants
    return routes


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` flags as a dict."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise TunelabError(f"--adapter {spec!r}: write NAME=PATH (the name requests use in their model field).")
        adapters[name] = path
    return adapters
