"""The model registry on SQLite and on a real PostgreSQL server: lineage, versions, promotion,
rollback, diff, concurrent writers, the schema's version, and bad input."""

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tunelab.cli.main import main
from tunelab.deploy.registry import Registry
from tunelab.errors import TunelabError


# ----------------------------------------------------------------------------- databases


def _postgres_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture(scope="module")
def postgres_server():
    """A throwaway PostgreSQL cluster (Debian's postgresql package), listening on a socket only."""
    initdb, pg_ctl = _postgres_tool("initdb"), _postgres_tool("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed (Debian: apt install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'tunelab[postgres]')")
    run_as = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a postgres user to start PostgreSQL as")
        run_as = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="tunelab-pg-", dir="/tmp"))
    folder.chmod(0o777)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(run_as + [initdb, "-D", str(folder / "data"), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    subprocess.run(run_as + [pg_ctl, "-D", str(folder / "data"), "-o", f"-p {port} -k {folder} -c listen_addresses=''",
                             "-l", str(folder / "log"), "-w", "start"], check=True, capture_output=True)  # fmt: skip
    yield folder, port
    subprocess.run(run_as + [pg_ctl, "-D", str(folder / "data"), "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    import psycopg

    folder, port = request.getfixturevalue("postgres_server")
    database = f"t_{os.getpid()}_{abs(hash(tmp_path)) % 10**8}"
    with psycopg.connect(host=str(folder), port=port, user="postgres", dbname="postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {database}")
    return f"postgresql+psycopg://postgres@/{database}?host={folder}&port={port}"


# ----------------------------------------------------------------------------- artifacts


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_run(root: Path, lr: float = 1e-4, data_text: str = '{"q": 1}\n', loss: float = 0.9) -> Path:
    """A run folder as tunelab writes one: run.json, config.yaml, summary.json, an adapter checkpoint."""
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"base weights")
    data = root / f"data-{sha256(data_text.encode())[:6]}.jsonl"
    data.write_text(data_text)
    run = root / f"run-{lr:g}-{loss:g}"
    checkpoint = run / "checkpoints" / "step-000020"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (checkpoint / "adapter_model.safetensors").write_bytes(f"adapter {lr} {loss}".encode())
    (run / "run.json").write_text('{"started": "2026-11-27 10:00:00"}')
    (run / "config.yaml").write_text(f"modelpool:\n  model_path: {base}\ndata:\n  path: {data}\nmethod:\n  optimizer:\n    lr: {lr}\n")
    summary = {"final_checkpoint": str(checkpoint), "global_step": 20, "evaluations": {"0": {"val/loss": 1.4}, "20": {"val/loss": loss}}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


# ----------------------------------------------------------------------------- behaviour


def test_a_run_is_registered_with_its_lineage(url, tmp_path):
    run = make_run(tmp_path)
    registry = Registry(url)
    v = registry.register("gsm8k-lora", run, by="alice")
    assert (v.name, v.version, v.kind, v.stage, v.created_by) == ("gsm8k-lora", 1, "run", "none", "alice")
    base_file = sha256(b"base weights")
    assert v.base_model == str(tmp_path / "base") and v.base_hash == sha256(b"model.safetensors" + bytes.fromhex(base_file))
    assert v.artifact_hash == sha256(b"adapter_model.safetensors" + bytes.fromhex(sha256(b"adapter 0.0001 0.9")))
    [(data_file, data_hash)] = v.data.items()
    assert data_hash == sha256(b'{"q": 1}\n') and data_file.endswith(".jsonl")
    assert v.metrics["val/loss"] == 0.9 and v.metrics["global_step"] == 20 and v.config["method"]["optimizer"]["lr"] == 1e-4
    again = Registry(url).get("gsm8k-lora", 1)  # read back through a new connection
    assert again == v
    adapter = Registry(url).register("gsm8k-lora", run / "checkpoints" / "step-000020")
    assert adapter.version == 2 and adapter.kind == "adapter" and adapter.artifact_hash == v.artifact_hash and adapter.metrics == v.metrics


def test_promote_rollback_delete_and_diff(url, tmp_path):
    registry = Registry(url)
    first = registry.register("m", make_run(tmp_path, lr=1e-4, loss=0.9)).version
    second = registry.register("m", make_run(tmp_path, lr=2e-4, data_text='{"q": 2}\n', loss=0.8), parent=first).version
    third = registry.register("m", make_run(tmp_path, lr=3e-4, loss=0.7)).version
    assert (first, second, third) == (1, 2, 3) and registry.get("m", 2).parent_version == 1
    with pytest.raises(TunelabError, match="has no production version: promote one"):
        registry.resolve("m@production")
    registry.promote("m", 1)
    registry.promote("m", 2, "staging")
    assert registry.resolve("m@production").version == 1 and registry.resolve("m").version == 1 and registry.resolve("m@staging").version == 2
    with pytest.raises(TunelabError, match="is in production: staging is for a candidate"):
        registry.promote("m", 1, "staging")  # it would leave no production version
    registry.promote("m", 2)
    registry.promote("m", 3)
    assert [(v.version, v.stage) for v in registry.list_versions("m")] == [(1, "archived"), (2, "archived"), (3, "production")]
    assert registry.rollback("m").version == 2 and registry.resolve("m@production").version == 2
    assert registry.rollback("m").version == 1
    with pytest.raises(TunelabError, match="no earlier production version remains"):
        registry.rollback("m")
    assert [(e["action"], e["version"], e["previous"]) for e in registry.history("m")] == [
        ("promote", 1, None), ("promote", 2, None), ("promote", 2, 1), ("promote", 3, 2), ("rollback", 2, 3), ("rollback", 1, 2),
    ]  # the staging promotion of 2 had no staging version before it
    with pytest.raises(TunelabError, match="is in production"):
        registry.delete("m", 1)
    registry.delete("m", 3)
    assert [v.version for v in registry.list_versions("m")] == [1, 2] and registry.resolve("m@latest").version == 2
    diff = registry.diff("m", 1, 2)
    assert diff["config"]["method.optimizer.lr"] == (1e-4, 2e-4)
    assert diff["metrics"]["val/loss"] == (0.9, 0.8) and len(diff["data"]) == 2  # one data file for the other
    assert set(diff["lineage"]) >= {"path", "artifact_hash", "parent_version"}


def _register_one(args):
    url, run = args
    return Registry(url).register("busy", run).version


def test_concurrent_registrations_get_distinct_versions(url, tmp_path):
    run = make_run(tmp_path)
    Registry(url)  # the schema, once, before the writers race
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        versions = pool.map(_register_one, [(url, run)] * 12)
    assert sorted(versions) == list(range(1, 13))


def test_a_registry_from_a_newer_tunelab_is_refused_and_the_schema_is_recorded(tmp_path):
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'r.db'}"
    registry = Registry(url)
    with registry.engine.begin() as connection:
        assert connection.execute(sa.text("SELECT version FROM tunelab_schema")).scalar() == 1
        connection.execute(sa.text("UPDATE tunelab_schema SET version = 99"))
    with pytest.raises(TunelabError, match="schema version 99, written by a newer tunelab"):
        Registry(url)


def test_bad_input_is_refused_with_what_to_do(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(TunelabError, match="is empty"):
        registry.list_versions("nothing")
    registry.register("m", make_run(tmp_path))
    with pytest.raises(TunelabError, match=r"no model named 'x'; it has: m"):
        registry.resolve("x@production")
    with pytest.raises(TunelabError, match="has no version 7; its versions are 1"):
        registry.promote("m", 7)
    with pytest.raises(TunelabError, match="--stage 'canary' is not one of"):
        registry.promote("m", 1, "canary")
    with pytest.raises(TunelabError, match="after '@' comes a version number"):
        registry.resolve("m@prod")
    with pytest.raises(TunelabError, match="'@' and '/' have meanings"):
        registry.register("m@2", make_run(tmp_path / "b"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="is not a run folder"):
        registry.register("m", tmp_path / "empty")
    with pytest.raises(TunelabError, match="does not exist"):
        registry.register("m", tmp_path / "missing")
    with pytest.raises(TunelabError, match="cannot be opened"):
        Registry("nosuchdb://x")


def test_the_command_line(tmp_path, capsys):
    url = ["--registry-url", f"sqlite:///{tmp_path / 'r.db'}"]
    runs = [make_run(tmp_path, lr=1e-4), make_run(tmp_path, lr=2e-4)]
    for run in runs:
        assert main(["registry", "register", "m", str(run), *url]) == 0
    assert main(["registry", "promote", "m", "1", *url]) == 0
    assert main(["registry", "promote", "m", "2", *url]) == 0
    capsys.readouterr()
    assert main(["registry", "rollback", "m", *url]) == 0
    assert "m@1 is production again" in capsys.readouterr().out
    assert main(["registry", "show", "m@production", "--json", *url]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 1 and shown["stage"] == "production" and shown["metrics"]["val/loss"] == 0.9
    assert main(["registry", "list", *url]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split()[:2] == ["m@1", "production"] and listed[1].split()[:2] == ["m@2", "archived"]
    assert main(["registry", "diff", "m", "1", "2", *url]) == 0
    assert "method.optimizer.lr: 0.0001 -> 0.0002" in capsys.readouterr().out
    assert main(["registry", "history", "m", *url]) == 0
    assert "rollback m@1 -> production (was m@2)" in capsys.readouterr().out
    assert main(["registry", "delete", "m", "1", *url]) == 1
    assert "is in production" in capsys.readouterr().err
    assert main(["registry", "promote", "m", *url]) == 2  # no version: a usage error
    assert main(["registry", "frobnicate"]) == 2
