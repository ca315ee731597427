"""The model registry: every trained adapter or model as a numbered version of a name, with where
it came from (run, resolved config, base model and its content hash, data files and their hashes,
metrics), and which version is in production or staging.

Storage is a database through SQLAlchemy: SQLite by default (a file next to the artifacts), or any
URL SQLAlchemy takes (``postgresql+psycopg://...`` for a team). Every change is one transaction:
two registrations at the same moment get distinct version numbers (a unique constraint, retried),
and a promotion or rollback reads and writes the stages of a name under one lock. The schema
carries its version and is migrated forward when an older registry is opened.

    registry = Registry("sqlite:///runs/registry.db")
    v = registry.register("gsm8k-lora", "runs/gsm8k-lora")    # a run folder, checkpoint, adapter or model folder
    registry.promote("gsm8k-lora", v.version, "production")
    registry.resolve("gsm8k-lora@production")                 # what the server serves
    registry.rollback("gsm8k-lora")                           # the production version before it
"""

import datetime as dt
import getpass
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import flatten
from tunelab.errors import TunelabError

SCHEMA_VERSION = 1
STAGES = ("production", "staging")  # a version's stage: one of these, "archived" (was production) or "none"
DEFAULT_URL = "sqlite:///runs/registry.db"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


@dataclass
class ModelVersion:
    name: str
    version: int
    kind: str  # run | checkpoint | adapter | model
    path: str
    stage: str
    base_model: str | None
    base_hash: str | None
    artifact_hash: str | None
    data: dict = field(default_factory=dict)  # data file -> sha256
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    parent_version: int | None = None
    created_at: str = ""
    created_by: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def registry_url(url: str | None = None) -> str:
    """``url``, else $TUNELAB_REGISTRY_URL, else a SQLite file at runs/registry.db."""
    return url or os.environ.get("TUNELAB_REGISTRY_URL") or DEFAULT_URL


class Registry:
    def __init__(self, url: str | None = None):
        import sqlalchemy as sa

        self.url = registry_url(url)
        try:
            options = {}
            if self.url.startswith("sqlite:///"):
                folder = Path(self.url[len("sqlite:///") :]).parent
                folder.mkdir(parents=True, exist_ok=True)
                options["connect_args"] = {"timeout": 60}  # writers wait for each other's transactions
            self.engine = sa.create_engine(self.url, **options)
            if self.engine.dialect.name == "sqlite":
                _immediate_transactions(self.engine)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError, OSError) as err:
            raise TunelabError(
                f"--registry-url {self.url!r} cannot be opened ({err}). Use sqlite:///PATH/registry.db or "
                "postgresql+psycopg://USER@HOST/DB (pip install 'tunelab[postgres]')."
            ) from None
        self._tables(sa)
        self._migrate(sa)

    # ----------------------------------------------------------------------------- schema

    def _tables(self, sa) -> None:
        self.metadata = sa.MetaData()
        self.schema_info = sa.Table("tunelab_schema", self.metadata, sa.Column("version", sa.Integer, nullable=False))
        self.versions = sa.Table(
            "model_versions", self.metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("name", sa.String(200), nullable=False),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("kind", sa.String(20), nullable=False),
            sa.Column("path", sa.Text, nullable=False),
            sa.Column("stage", sa.String(20), nullable=False),
            sa.Column("base_model", sa.Text), sa.Column("base_hash", sa.String(64)), sa.Column("artifact_hash", sa.String(64)),
            sa.Column("data", sa.Text), sa.Column("config", sa.Text), sa.Column("metrics", sa.Text),
            sa.Column("parent_version", sa.Integer),
            sa.Column("created_at", sa.String(40), nullable=False), sa.Column("created_by", sa.String(200), nullable=False),
            sa.UniqueConstraint("name", "version", name="one_number_per_version"),
        )  # fmt: skip
        self.events = sa.Table(
            "stage_events", self.metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("name", sa.String(200), nullable=False), sa.Column("version", sa.Integer, nullable=False),
            sa.Column("stage", sa.String(20), nullable=False), sa.Column("action", sa.String(20), nullable=False),
            sa.Column("previous", sa.Integer),  # the version that held the stage before
            sa.Column("at", sa.String(40), nullable=False), sa.Column("by", sa.String(200), nullable=False),
        )  # fmt: skip

    # Each migration takes a registry at schema version N-1 to N, in one transaction.
    def _migrate(self, sa) -> None:
        migrations = {1: lambda connection: self.metadata.create_all(connection)}
        with self.engine.begin() as connection:
            found = sa.inspect(connection).has_table("tunelab_schema")
            current = connection.execute(sa.select(self.schema_info.c.version)).scalar() if found else 0
            if current is None:
                current = 0
            if current > SCHEMA_VERSION:
                raise TunelabError(
                    f"The registry at {self.url} has schema version {current}, written by a newer tunelab than this one "
                    f"(which knows version {SCHEMA_VERSION}). Upgrade tunelab to use it."
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                migrations[version](connection)
                connection.execute(self.schema_info.delete())
                connection.execute(self.schema_info.insert().values(version=version))

    # ----------------------------------------------------------------------------- reading

    def _version(self, row) -> ModelVersion:
        return ModelVersion(
            row.name, row.version, row.kind, row.path, row.stage, row.base_model, row.base_hash, row.artifact_hash,
            json.loads(row.data or "{}"), json.loads(row.config or "{}"), json.loads(row.metrics or "{}"),
            row.parent_version, row.created_at, row.created_by,
        )  # fmt: skip

    def names(self) -> list[str]:
        import sqlalchemy as sa

        with self.engine.connect() as connection:
            return list(connection.execute(sa.select(self.versions.c.name).distinct().order_by(self.versions.c.name)).scalars())

    def list_versions(self, name: str | None = None) -> list[ModelVersion]:
        import sqlalchemy as sa

        query = sa.select(self.versions).order_by(self.versions.c.name, self.versions.c.version)
        if name is not None:
            query = query.where(self.versions.c.name == name)
        with self.engine.connect() as connection:
            rows = [self._version(row) for row in connection.execute(query)]
        if name is not None and not rows:
            raise TunelabError(self._unknown_name(name))
        return rows

    def _unknown_name(self, name: str) -> str:
        known = self.names()
        return f"The registry has no model named {name!r}" + (f"; it has: {', '.join(known)}." if known else " (it is empty): register one first.")

    def get(self, name: str, version: int) -> ModelVersion:
        versions = self.list_versions(name)
        for v in versions:
            if v.version == version:
                return v
        raise TunelabError(f"{name!r} has no version {version}; its versions are {', '.join(str(v.version) for v in versions)}.")

    def resolve(self, ref: str) -> ModelVersion:
        """``name@production``, ``name@staging``, ``name@3``, ``name@latest`` or ``name`` (its
        production version)."""
        name, _, which = ref.partition("@")
        which = which or "production"
        versions = self.list_versions(name)
        if which == "latest":
            return versions[-1]
        if which.isdigit():
            return self.get(name, int(which))
        if which not in STAGES:
            raise TunelabError(f"{ref!r}: after '@' comes a version number, latest, or a stage ({', '.join(STAGES)}).")
        staged = [v for v in versions if v.stage == which]
        if not staged:
            raise TunelabError(f"{name!r} has no {which} version: promote one with `tunelab registry promote {name} VERSION --stage {which}`.")
        return staged[0]

    # ----------------------------------------------------------------------------- writing

    def register(self, name: str, path: str | Path, parent: int | None = None, by: str | None = None) -> ModelVersion:
        """``path`` (a run folder, a checkpoint, an adapter or a model folder) as the next version of ``name``."""
        import sqlalchemy as sa

        if not name or "@" in name or "/" in name:
            raise TunelabError(f"Model name {name!r}: use letters, digits, '-', '_' and '.' ('@' and '/' have meanings in references).")
        lineage = describe_artifact(Path(path))
        if parent is not None:
            self.get(name, parent)
        values = {
            "name": name, "kind": lineage["kind"], "path": lineage["path"], "stage": "none",
            "base_model": lineage["base_model"], "base_hash": lineage["base_hash"], "artifact_hash": lineage["artifact_hash"],
            "data": json.dumps(lineage["data"]), "config": json.dumps(lineage["config"]), "metrics": json.dumps(lineage["metrics"]),
            "parent_version": parent, "created_at": _now(), "created_by": by or _user(),
        }  # fmt: skip
        for _attempt in range(50):  # another writer may take the same number first: the constraint refuses it, try the next
            try:
                with self.engine.begin() as connection:
                    latest = connection.execute(sa.select(sa.func.max(self.versions.c.version)).where(self.versions.c.name == name)).scalar()
                    values["version"] = (latest or 0) + 1
                    connection.execute(self.versions.insert().values(**values))
                return self.get(name, values["version"])
            except sa.exc.IntegrityError:
                continue
            except sa.exc.OperationalError as err:  # SQLite: "database is locked" past the timeout
                if "locked" not in str(err):
                    raise
        raise TunelabError(f"Could not give {name!r} a version number: other writers kept taking them. Try again.")

    def promote(self, name: str, version: int, stage: str = "production", by: str | None = None) -> ModelVersion:
        """``version`` becomes the ``stage`` version of ``name``; the version it replaces in
        production is archived (rollback returns to it), in staging goes back to none."""
        if stage not in STAGES:
            raise TunelabError(f"--stage {stage!r} is not one of: {', '.join(STAGES)}.")
        self.get(name, version)
        with self._locked(name) as (connection, rows):
            current = next((r.version for r in rows if r.stage == stage), None)
            if current == version:
                return self.get(name, version)
            if stage == "staging" and any(r.version == version and r.stage == "production" for r in rows):
                raise TunelabError(f"{name}@{version} is in production: staging is for a candidate; promote another version to production first.")
            self._set_stage(connection, name, current, "archived" if stage == "production" else "none")
            self._set_stage(connection, name, version, stage)
            self._event(connection, name, version, stage, "promote", current, by)
        return self.get(name, version)

    def rollback(self, name: str, by: str | None = None) -> ModelVersion:
        """Production goes back to the version that held it before the current one was promoted."""
        import sqlalchemy as sa

        with self._locked(name) as (connection, rows):
            current = next((r.version for r in rows if r.stage == "production"), None)
            if current is None:
                raise TunelabError(f"{name!r} has no production version to roll back.")
            promoted = connection.execute(
                sa.select(self.events.c.previous).where(
                    (self.events.c.name == name) & (self.events.c.version == current) & (self.events.c.stage == "production")
                    & (self.events.c.action == "promote")
                ).order_by(self.events.c.id.desc()).limit(1)
            ).scalar()  # fmt: skip
            if promoted is None or not any(r.version == promoted for r in rows):
                raise TunelabError(f"{name}@{current} is in production and no earlier production version remains to roll back to.")
            self._set_stage(connection, name, current, "archived")
            self._set_stage(connection, name, promoted, "production")
            self._event(connection, name, promoted, "production", "rollback", current, by)
        return self.get(name, promoted)

    def delete(self, name: str, version: int) -> None:
        v = self.get(name, version)
        if v.stage == "production":
            raise TunelabError(f"{v.ref} is in production: promote another version or roll back before deleting it.")
        with self.engine.begin() as connection:
            connection.execute(self.versions.delete().where((self.versions.c.name == name) & (self.versions.c.version == version)))

    def history(self, name: str) -> list[dict]:
        import sqlalchemy as sa

        self.list_versions(name)
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(self.events).where(self.events.c.name == name).order_by(self.events.c.id))
            return [dict(row._mapping) for row in rows]

    def diff(self, name: str, first: int, second: int) -> dict:
        """What differs between two versions: config keys, data files, metrics and lineage."""
        a, b = self.get(name, first), self.get(name, second)
        flat_a, flat_b = flatten(a.config), flatten(b.config)
        return {
            "config": {k: (flat_a.get(k), flat_b.get(k)) for k in sorted(set(flat_a) | set(flat_b)) if flat_a.get(k) != flat_b.get(k)},
            "data": {k: (a.data.get(k), b.data.get(k)) for k in sorted(set(a.data) | set(b.data)) if a.data.get(k) != b.data.get(k)},
            "metrics": {k: (a.metrics.get(k), b.metrics.get(k)) for k in sorted(set(a.metrics) | set(b.metrics)) if a.metrics.get(k) != b.metrics.get(k)},
            "lineage": {k: (getattr(a, k), getattr(b, k)) for k in ("kind", "path", "base_model", "base_hash", "artifact_hash", "parent_version")
                        if getattr(a, k) != getattr(b, k)},
        }  # fmt: skip

    # ----------------------------------------------------------------------------- helpers

    def _locked(self, name: str):
        """A transaction holding the rows of ``name`` (locked for update where the database can)."""
        import contextlib

        import sqlalchemy as sa

        @contextlib.contextmanager
        def locked():
            with self.engine.begin() as connection:
                rows = list(connection.execute(sa.select(self.versions).where(self.versions.c.name == name).with_for_update()))
                if not rows:
                    raise TunelabError(self._unknown_name(name))
                yield connection, rows

        return locked()

    def _set_stage(self, connection, name: str, version: int | None, stage: str) -> None:
        if version is not None:
            connection.execute(self.versions.update().where((self.versions.c.name == name) & (self.versions.c.version == version)).values(stage=stage))

    def _event(self, connection, name: str, version: int, stage: str, action: str, previous: int | None, by: str | None) -> None:
        connection.execute(self.events.insert().values(name=name, version=version, stage=stage, action=action, previous=previous, at=_now(), by=by or _user()))


def _immediate_transactions(engine) -> None:
    """SQLite transactions that take the write lock when they begin (BEGIN IMMEDIATE), so that two
    writers never both read a state and then both write from it; the other waits (the timeout)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the driver's own BEGIN off: the one below instead

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


# ----------------------------------------------------------------------------- lineage


def describe_artifact(path: Path) -> dict:
    """What a registered folder is and where it came from."""
    if not path.exists():
        raise TunelabError(f"'{path}' does not exist: register a run folder, a checkpoint, an adapter folder or a model folder.")
    path = path.resolve()
    run = _run_folder(path)
    config = _read_yaml(run / "config.yaml") if run is not None else {}
    summary = _read_json(run / "summary.json") if run is not None else {}
    if run == path:
        kind = "run"
        artifact = Path(summary["final_checkpoint"]) if summary.get("final_checkpoint") else None
    elif (path / "adapter_config.json").exists() or (path / "bottleneck_config.json").exists():
        kind, artifact = "adapter", path
    elif (path / "config.json").exists():
        kind, artifact = ("checkpoint" if run is not None else "model"), path
    else:
        raise TunelabError(
            f"'{path}' is not a run folder (run.json), an adapter folder (adapter_config.json) or a model folder (config.json): "
            "register one of those."
        )
    base_model = ((config.get("modelpool") or {}).get("model_path")) if config else None
    adapter_config = _read_json(artifact / "adapter_config.json") if artifact is not None and (artifact / "adapter_config.json").exists() else {}
    base_model = base_model or adapter_config.get("base_model_name_or_path")
    data_cfg = config.get("data") or {}
    data_files = [data_cfg.get("path"), data_cfg.get("val_path")] + [s.get("path") for s in data_cfg.get("sources") or [] if isinstance(s, dict)]
    return {
        "kind": kind, "path": str(path), "config": config,
        "metrics": _metrics(summary),
        "base_model": base_model, "base_hash": _weights_hash(base_model) if base_model else None,
        "artifact_hash": _folder_hash(artifact) if artifact is not None and artifact.is_dir() else None,
        "data": {str(f): _file_hash(f) for f in data_files if f},
    }  # fmt: skip


def _run_folder(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if (folder / "run.json").exists() and (folder / "config.yaml").exists():
            return folder
    return None


def _metrics(summary: dict) -> dict:
    """The run's last evaluation (val/...), its speed and size: the numbers versions are compared by."""
    metrics = {}
    evaluations = summary.get("evaluations") or {}
    if evaluations:
        metrics.update(evaluations[max(evaluations, key=lambda step: int(step))])
    for key in ("global_step", "epochs", "train_seconds", "tokens_per_s", "supervised_tokens_per_s", "trainable_parameters"):
        if key in summary:
            metrics[key] = summary[key]
    return metrics


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # a config that does not parse is lineage we cannot read, not a reason to refuse
        return {}


def _file_hash(spec: str) -> str | None:
    """sha256 of a data or weights file (``pkg://`` paths resolved); None where it is not a local file."""
    from tunelab.resources import resolve_path

    try:
        path = resolve_path(spec, "the file") if spec.startswith("pkg://") else Path(spec)
    except TunelabError:
        return None
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_hash(folder: Path) -> str | None:
    """sha256 over a folder's weight files (name and content), in name order."""
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file() and p.name != "state.ckpt")
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(bytes.fromhex(_file_hash(str(file))))
    return digest.hexdigest()


def _weights_hash(spec: str) -> str | None:
    """The base model's content hash: its file, or its folder's weight files; None for a hub id."""
    if spec.startswith("pkg://") or Path(spec).is_file():
        return _file_hash(spec)
    return _folder_hash(Path(spec)) if Path(spec).is_dir() else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment
        return "unknown"
