"""The board's web app: one page (``static/``) and the JSON API it calls.

    GET  /                          the page: Launch, Watch, Chat, Compare
    GET  /api/form                  the launch form's fields and the shipped config options
    GET  /api/defaults?method=...   each field's value when left empty, for the chosen groups
    POST /api/validate              {form} -> {overrides, errors: {field: message}}
    POST /api/runs                  {form} -> launch (400 with the errors when it does not validate)
    GET  /api/runs                  every run's status, progress and estimate
    GET  /api/runs/NAME             one run's status and the tail of its log
    GET  /api/runs/NAME/metrics     metrics.csv as series
    POST /api/runs/NAME/stop|resume
    GET  /api/compare?runs=A,B      config differences and final numbers
    POST /api/chat                  {run, prompt, max_tokens} -> base and tuned answers
    GET  /api/registry              registered versions (registry URL given to the board)
"""

from pathlib import Path

from tunelab.board.chat import ChatServers
from tunelab.board.form import DEFAULT_FORM, defaults, field_dicts, validate
from tunelab.board.runs import RunBook
from tunelab.errors import TunelabError

STATIC = Path(__file__).resolve().parent / "static"


def create_app(runs: RunBook, chat: ChatServers | None = None, registry_url: str | None = None):
    from contextlib import asynccontextmanager

    from fastapi import Body, FastAPI, Query
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    chat = chat or ChatServers()

    @asynccontextmanager
    async def lifespan(app):
        yield
        chat.close()  # the serve processes end with the board; runs go on (their own process groups)

    app = FastAPI(title="tunelab board", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def refused(err: TunelabError, status: int = 400, field: str = "form") -> JSONResponse:
        return JSONResponse({"errors": {field: str(err)}}, status_code=status)

    def known(name: str) -> str:
        if name not in runs.names():
            raise TunelabError(f"No run named '{name}' under {runs.root}.")
        return name

    @app.exception_handler(TunelabError)
    async def _tunelab_error(request, err: TunelabError):  # noqa: ARG001 - FastAPI's handler signature
        return refused(err)

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/form")
    def form():
        return {"fields": field_dicts(), "defaults": DEFAULT_FORM, "runs_dir": str(runs.root.resolve())}

    @app.get("/favicon.ico")
    def favicon():
        return Response(status_code=204)

    @app.get("/api/defaults")
    def form_defaults(method: str = "", modelpool: str = "", data: str = "", taskpool: str = ""):
        return defaults({"method": method, "modelpool": modelpool, "data": data, "taskpool": taskpool})

    @app.post("/api/validate")
    def check(form: dict = Body(...)):
        overrides, errors = validate(form, runs)
        return {"overrides": overrides, "errors": errors, "command": "tunelab train " + " ".join(overrides)}

    @app.post("/api/runs")
    def launch(form: dict = Body(...)):
        overrides, errors = validate(form, runs)
        if errors:
            return JSONResponse({"overrides": overrides, "errors": errors}, status_code=400)
        return {**runs.launch(str(form["name"]).strip(), overrides), "command": "tunelab train " + " ".join(overrides)}

    @app.get("/api/runs")
    def list_runs():
        return [runs.status(name) for name in runs.names()]

    @app.get("/api/runs/{name}")
    def one_run(name: str):
        return {**runs.status(known(name)), "log": runs.log_tail(name)}

    @app.get("/api/runs/{name}/metrics")
    def metrics(name: str):
        return runs.metrics(known(name))

    @app.post("/api/runs/{name}/stop")
    def stop(name: str):
        return runs.stop(known(name))

    @app.post("/api/runs/{name}/resume")
    def resume(name: str):
        return runs.resume(known(name))

    @app.get("/api/compare")
    def compare_view(names: str = Query("", alias="runs")):
        chosen = [known(n) for n in names.split(",") if n]
        if len(chosen) < 2:
            raise TunelabError("Pick at least two runs to compare.")
        return runs.compare(chosen)

    @app.post("/api/chat")
    def ask(request: dict = Body(...)):
        name = known(str(request.get("run") or ""))
        max_tokens = int(request.get("max_tokens") or 128)
        if not 1 <= max_tokens <= 1024:
            raise TunelabError(f"max_tokens {max_tokens}: use 1 to 1024.")
        return chat.ask(runs.folder(name), str(request.get("prompt") or ""), max_tokens, float(request.get("temperature") or 0.0))

    @app.get("/api/registry")
    def registry():
        if registry_url is None:
            return {"url": None, "versions": [], "note": "Start the board with --registry-url URL (or $TUNELAB_REGISTRY_URL) to list registered versions."}
        from tunelab.deploy.registry import Registry

        folders = {str(runs.folder(n).resolve()): n for n in runs.names()}
        versions = []
        for version in Registry(registry_url).list_versions():
            row = {k: v for k, v in version.to_dict().items() if k not in ("config", "data")}
            row["run"] = next((name for folder, name in folders.items() if version.path == folder or version.path.startswith(folder + "/")), None)
            versions.append(row)
        return {"url": registry_url, "versions": versions}

    return app
