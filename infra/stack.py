"""Start, stop and report the local server stack on 127.0.0.1 (see ``infra/stack.sh``).

Services, all from registry packages installed in the project's environment:

- ``seaweedfs``: ``weed mini`` (S3 API with credentials), data under the stack dir;
- ``mlflow``: ``mlflow server`` (sqlite backend, artifacts proxied to S3 on seaweedfs);
- ``prefect``: ``prefect server start`` (sqlite, its own PREFECT_HOME);
- ``dask-scheduler``: ``dask scheduler`` (no dashboard), for ``federate.task_runner: dask``;
- ``dask-workers``: ``dask worker --nworkers N --nthreads 1`` (N single-threaded worker
  processes under one nanny process, default 2), run from the project root with the
  project importable and the clients' environment (the env file's S3 endpoint and
  credentials, store, MLflow and Prefect URLs): clients train there and use the store.

Everything lives under ``FEDFORGET_STACK_DIR`` (default ``<project>/.stack``):
``data/``, ``logs/``, ``pids/``, ``stack.json`` (ports, bucket) and
``credentials.json`` (generated once, mode 0600). ``up`` is idempotent, waits
on health endpoints (no fixed sleeps) and writes a ``source``-able env file
(``FEDFORGET_STACK_ENV``, default ``infra/stack.env``) pointing fedforget,
mlflow, prefect, dvc, the aws CLI and Dask runs (``FEDFORGET_DASK_ADDRESS``) at
the stack. ``down`` stops by PID (each service's whole process group, workers
before the scheduler) and leaves the data on disk.

Ports (first ``up`` records them in ``stack.json``; environment variables
override): ``FEDFORGET_STACK_S3_PORT`` (9000), ``FEDFORGET_STACK_MLFLOW_PORT``
(5000), ``FEDFORGET_STACK_PREFECT_PORT`` (4200), ``FEDFORGET_STACK_DASK_PORT``
(8786, the Dask scheduler; its workers listen on ports the kernel picks), and
``FEDFORGET_STACK_SEAWEED_PORT`` (19330: SeaweedFS's internal master, volume,
filer and admin ports are this and the next three, each with a gRPC port
10000 higher). ``FEDFORGET_STACK_DASK_WORKERS`` (2) sets the number of Dask
worker processes, recorded like the ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
# In dependency order (``up`` goes forward, ``down`` backward): MLflow's artifacts live on
# seaweedfs; Dask workers register with the scheduler.
SERVICES = ("seaweedfs", "mlflow", "prefect", "dask-scheduler", "dask-workers")
DEFAULT_PORTS = {"s3": 9000, "mlflow": 5000, "prefect": 4200, "seaweed": 19330, "dask": 8786}
PORT_ENV = {
    "s3": "FEDFORGET_STACK_S3_PORT",
    "mlflow": "FEDFORGET_STACK_MLFLOW_PORT",
    "prefect": "FEDFORGET_STACK_PREFECT_PORT",
    "seaweed": "FEDFORGET_STACK_SEAWEED_PORT",
    "dask": "FEDFORGET_STACK_DASK_PORT",
}
SERVICE_PORT = {"mlflow": "mlflow", "prefect": "prefect", "dask-scheduler": "dask"}
DEFAULT_DASK_WORKERS = 2
DASK_WORKERS_ENV = "FEDFORGET_STACK_DASK_WORKERS"
DASK_WORKER_NAME = "fedforget-stack"  # workers are named fedforget-stack-0, -1, ...
# What the stack's environment file sets for clients; the Dask workers get the same, and not
# whatever the shell that ran ``up`` had under these prefixes.
CLIENT_PREFIXES = ("AWS_", "FEDFORGET_", "MLFLOW_", "PREFECT_")


class StackError(RuntimeError):
    pass


# --------------------------------------------------------------------------- configuration


def stack_dir() -> Path:
    return Path(os.environ.get("FEDFORGET_STACK_DIR") or ROOT / ".stack").resolve()


def env_file() -> Path:
    return Path(os.environ.get("FEDFORGET_STACK_ENV") or ROOT / "infra" / "stack.env").resolve()


def load_state(directory: Path) -> dict[str, Any]:
    """Ports, bucket and Dask worker count: recorded on first ``up`` so restarts keep them."""
    path = directory / "stack.json"
    state = json.loads(path.read_text()) if path.is_file() else {}
    ports = dict(DEFAULT_PORTS, **state.get("ports", {}))
    for name, variable in PORT_ENV.items():
        if os.environ.get(variable):
            ports[name] = int(os.environ[variable])
    bucket = os.environ.get("FEDFORGET_STACK_BUCKET") or state.get("bucket") or "fedforget"
    workers = int(os.environ.get(DASK_WORKERS_ENV) or state.get("dask_workers") or DEFAULT_DASK_WORKERS)
    if workers < 1:
        raise StackError(f"{DASK_WORKERS_ENV} must be at least 1, not {workers}")
    return {"ports": ports, "bucket": bucket, "dask_workers": workers}


def save_state(directory: Path, state: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stack.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def credentials(directory: Path) -> dict[str, str]:
    """The stack's S3 credentials, generated once and kept with mode 0600."""
    path = directory / "credentials.json"
    if path.is_file():
        return json.loads(path.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    creds = {"access_key": "ff" + secrets.token_hex(8), "secret_key": secrets.token_urlsafe(30)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds, fh)
    return creds


def s3_identities(directory: Path) -> Path:
    """SeaweedFS's S3 identities file (mode 0600) holding the stack's one admin identity."""
    creds = credentials(directory)
    path = directory / "s3-identities.json"
    config = {
        "identities": [
            {
                "name": "fedforget",
                "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh)
    return path


def client_env(state: dict[str, Any], creds: dict[str, str]) -> dict[str, str]:
    """What clients need to use the stack (the content of the env file)."""
    s3 = f"http://{HOST}:{state['ports']['s3']}"
    return {
        "FEDFORGET_STORE": f"s3://{state['bucket']}/store",
        "FEDFORGET_DVC_REMOTE": "stack",
        "AWS_ENDPOINT_URL_S3": s3,
        "AWS_ENDPOINT_URL": s3,  # the aws CLI
        "AWS_ACCESS_KEY_ID": creds["access_key"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{state['ports']['mlflow']}",
        "PREFECT_API_URL": f"http://{HOST}:{state['ports']['prefect']}/api",
        "FEDFORGET_DASK_ADDRESS": dask_address(state),
    }


def dask_address(state: dict[str, Any]) -> str:
    return f"tcp://{HOST}:{state['ports']['dask']}"


def write_env_file(values: dict[str, str]) -> Path:
    path = env_file()
    lines = ["# Written by infra/stack.sh up. Source it: . infra/stack.env (holds credentials: keep it private)."]
    lines += [f"export {k}={v}" for k, v in values.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- services


def service_command(name: str, directory: Path, state: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    ports, bucket = state["ports"], state["bucket"]
    creds = credentials(directory)
    base_env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": creds["access_key"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    s3 = f"http://{HOST}:{ports['s3']}"
    if name == "seaweedfs":
        data = directory / "data" / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        b = ports["seaweed"]
        cmd = [
            str(BIN / "weed"), f"-logdir={directory / 'logs'}", "mini", f"-dir={data}",
            f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3'] + 10000}",
            f"-master.port={b}", f"-master.port.grpc={b + 10000}",
            f"-volume.port={b + 1}", f"-volume.port.grpc={b + 10001}",
            f"-filer.port={b + 2}", f"-filer.port.grpc={b + 10002}",
            "-admin.ui=false", f"-admin.port={b + 3}", f"-admin.port.grpc={b + 10003}",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={bucket}",
            f"-s3.config={s3_identities(directory)}",
            f"-s3.localSocket={directory / 'data' / 's3.sock'}",
            f"-filer.localSocket={directory / 'data' / 'filer.sock'}",
        ]  # fmt: skip
        # Credentials go in through the identities file, not the environment: with
        # environment variables weed logs the access key id at startup.
        return cmd, {k: v for k, v in base_env.items() if not k.startswith("AWS_")}
    if name == "mlflow":
        data = directory / "data" / "mlflow"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(BIN / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{bucket}/mlflow",
            "--host", HOST, "--port", str(ports["mlflow"]), "--workers", "1",
        ]  # fmt: skip
        env = {
            **base_env,
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "AWS_ENDPOINT_URL_S3": s3,
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        return cmd, env
    if name == "prefect":
        home = directory / "data" / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            HOST,
            "--port",
            str(ports["prefect"]),
            "--analytics-off",
        ]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": f"http://{HOST}:{ports['prefect']}/api",
            # Concurrency-slot leases on disk, not in memory: a restarted server still knows the
            # lease of a model writer that held the slot, and reclaims the slot once it expires.
            # In memory they are lost and the slot stays occupied forever.
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        }
        return cmd, env
    if name in ("dask-scheduler", "dask-workers"):
        # The project importable (flows.runners' tasks, components' protocols), telemetry off.
        project = {
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
        }
        own = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_PREFIXES)}
        if name == "dask-scheduler":  # schedules only: no credentials
            cmd = [
                str(BIN / "dask"), "scheduler", "--host", HOST, "--port", str(ports["dask"]),
                "--no-dashboard", "--no-jupyter",
            ]  # fmt: skip
            return cmd, {**own, **project}
        scratch = directory / "data" / "dask"
        scratch.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(BIN / "dask"), "worker", dask_address(state),
            "--nworkers", str(state["dask_workers"]), "--nthreads", "1", "--name", DASK_WORKER_NAME,
            "--host", HOST, "--no-dashboard", "--local-directory", str(scratch),
        ]  # fmt: skip
        # Clients train here and read and write the store: the environment clients get.
        return cmd, {**own, **client_env(state, creds), **project}
    raise StackError(f"unknown service {name!r}; services: {', '.join(SERVICES)}")


def _http_ok(url: str, accept: Callable[[int, bytes], bool]) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return accept(response.status, response.read())
    except urllib.error.HTTPError as exc:
        return accept(exc.code, b"")
    except (OSError, ValueError):
        return False


def healthy(name: str, directory: Path, state: dict[str, Any]) -> bool:
    ports = state["ports"]
    if name == "seaweedfs":
        if not _http_ok(f"http://{HOST}:{ports['s3']}/", lambda code, _: code in (200, 403)):
            return False
        return _bucket_ready(directory, state)
    if name == "mlflow":
        return _http_ok(f"http://{HOST}:{ports['mlflow']}/health", lambda code, body: code == 200 and b"OK" in body)
    if name == "prefect":
        return _http_ok(
            f"http://{HOST}:{ports['prefect']}/api/health", lambda code, body: code == 200 and b"true" in body
        )
    if name == "dask-scheduler":
        return dask_identity(state) is not None
    if name == "dask-workers":
        return len(stack_workers(dask_identity(state) or {})) >= state["dask_workers"]
    raise StackError(f"unknown service {name!r}")


def dask_identity(state: dict[str, Any]) -> dict[str, Any] | None:
    """What the scheduler says of itself and its workers, or None when no Dask scheduler answers."""
    import asyncio

    from distributed.core import rpc

    async def ask() -> dict[str, Any]:
        scheduler = rpc(dask_address(state), timeout=2)
        try:
            return await asyncio.wait_for(scheduler.identity(), 5)
        finally:
            await scheduler.close_rpc()

    try:
        identity = asyncio.run(ask())
    except Exception:  # refused, closed, timed out, not speaking Dask's protocol: not healthy
        return None
    return identity if identity.get("type") == "Scheduler" else None


def stack_workers(identity: dict[str, Any]) -> list[str]:
    """The running workers ``dask-workers`` started (by name), of those registered."""
    return [
        address
        for address, worker in identity.get("workers", {}).items()
        if str(worker.get("name", "")).startswith(DASK_WORKER_NAME) and worker.get("status") == "running"
    ]


def _bucket_ready(directory: Path, state: dict[str, Any]) -> bool:
    """A signed request succeeds (credentials work) and the bucket exists (created if missing)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    creds = credentials(directory)
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://{HOST}:{state['ports']['s3']}",
        aws_access_key_id=creds["access_key"],
        aws_secret_access_key=creds["secret_key"],
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5, s3={"addressing_style": "path"}),
    )
    try:
        client.head_bucket(Bucket=state["bucket"])
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
            return False
        try:
            client.create_bucket(Bucket=state["bucket"])
        except (ClientError, BotoCoreError):
            return False
    except BotoCoreError:
        return False
    return store_round_trip(client, state["bucket"])


def store_round_trip(client: Any, bucket: str) -> bool:
    """Write, read back and delete a probe object: the store can really serve data.

    A restarted SeaweedFS answers on its S3 port (and even HEAD bucket) before
    its volume server is ready, and then fails writes with 500 InternalError.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    key = f".health/probe-{secrets.token_hex(4)}"
    payload = secrets.token_bytes(64)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=payload)
        ok = client.get_object(Bucket=bucket, Key=key)["Body"].read() == payload
        client.delete_object(Bucket=bucket, Key=key)
        return ok
    except (ClientError, BotoCoreError):
        return False


def pid_file(directory: Path, name: str) -> Path:
    return directory / "pids" / f"{name}.pid"


def running_pid(directory: Path, name: str) -> int | None:
    path = pid_file(directory, name)
    if not path.is_file():
        return None
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        path.unlink(missing_ok=True)
        return None
    except PermissionError:
        return None
    return pid


def _port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` (TIME_WAIT leftovers do not count, as for servers)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _ports_of(name: str, state: dict[str, Any]) -> list[tuple[str, int]]:
    ports = state["ports"]
    if name == "seaweedfs":
        b = ports["seaweed"]
        own = [
            ("S3, FEDFORGET_STACK_S3_PORT", ports["s3"]),
            ("S3 gRPC, FEDFORGET_STACK_S3_PORT + 10000", ports["s3"] + 10000),
        ]
        internal = [b, b + 1, b + 2, b + 3, b + 10000, b + 10001, b + 10002, b + 10003]
        return own + [("SeaweedFS internal, from FEDFORGET_STACK_SEAWEED_PORT", p) for p in internal]
    if name not in SERVICE_PORT:  # Dask workers listen on ports the kernel picks
        return []
    return [(PORT_ENV[SERVICE_PORT[name]], ports[SERVICE_PORT[name]])]


def wait_until(check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.1
    while time.monotonic() < deadline:
        if check():
            return
        if not alive():
            raise StackError(f"{what} exited while starting; see its log")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    raise StackError(f"{what} did not become healthy within {timeout:.0f} s; see its log")


def start(name: str, directory: Path, state: dict[str, Any], timeout: float = 120.0) -> str:
    pid = running_pid(directory, name)
    if pid is not None:
        wait_until(
            lambda: healthy(name, directory, state), timeout, name, lambda: running_pid(directory, name) is not None
        )
        return f"{name}: already running (pid {pid})"
    busy = [f"{port} ({var})" for var, port in _ports_of(name, state) if not _port_free(port)]
    if busy:
        raise StackError(f"{name}: port(s) in use: {', '.join(busy)}; choose others with the variable named")
    if name == "dask-workers" and not healthy("dask-scheduler", directory, state):
        raise StackError(f"dask-workers: no Dask scheduler answers at {dask_address(state)}; start dask-scheduler")
    cmd, env = service_command(name, directory, state)
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    (directory / "pids").mkdir(parents=True, exist_ok=True)
    log = open(directory / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the server writes it after we return
    cwd = ROOT if name.startswith("dask-") else directory  # Dask: where the project's code is
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    pid_file(directory, name).write_text(f"{process.pid}\n")
    started = time.monotonic()
    wait_until(lambda: healthy(name, directory, state), timeout, name, lambda: process.poll() is None)
    return f"{name}: started (pid {process.pid}) in {time.monotonic() - started:.1f} s"


def stop(name: str, directory: Path, timeout: float = 30.0) -> str:
    pid = running_pid(directory, name)
    if pid is None:
        return f"{name}: not running"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)  # the service and its workers (it leads its own session)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (_alive(pid) or _group_alive(pid)):
        time.sleep(0.2)
    if _alive(pid) or _group_alive(pid):  # the service, or a worker process it left behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while _alive(pid) or _group_alive(pid):
            time.sleep(0.1)
    pid_file(directory, name).unlink(missing_ok=True)
    return f"{name}: stopped (pid {pid})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` (a service's session) is still running; zombies do not count."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


# --------------------------------------------------------------------------- commands


def _select(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in SERVICES]
    if unknown:
        raise StackError(f"unknown service(s) {', '.join(unknown)}; services: {', '.join(SERVICES)}")
    return names or list(SERVICES)


def up(names: list[str]) -> int:
    directory = stack_dir()
    state = load_state(directory)
    save_state(directory, state)
    for name in _select(names):  # in dependency order (SERVICES)
        print(start(name, directory, state), flush=True)
    path = write_env_file(client_env(state, credentials(directory)))
    print(f"environment: . {path}")
    print(f"MLflow UI:   http://{HOST}:{state['ports']['mlflow']}")
    print(f"Prefect UI:  http://{HOST}:{state['ports']['prefect']}")
    print(f"S3:          http://{HOST}:{state['ports']['s3']} (bucket {state['bucket']})")
    print(f"Dask:        {dask_address(state)} ({state['dask_workers']} workers; federate.task_runner=dask)")
    return 0


def down(names: list[str]) -> int:
    directory = stack_dir()
    for name in reversed(_select(names)):
        print(stop(name, directory), flush=True)
    print(f"data kept in {directory / 'data'}")
    return 0


def status(names: list[str]) -> int:
    directory = stack_dir()
    state = load_state(directory)
    all_ok = True
    for name in _select(names):
        pid = running_pid(directory, name)
        ok = pid is not None and healthy(name, directory, state)
        all_ok &= ok
        where = {
            "seaweedfs": f"http://{HOST}:{state['ports']['s3']}",
            "mlflow": f"http://{HOST}:{state['ports']['mlflow']}",
            "prefect": f"http://{HOST}:{state['ports']['prefect']}",
            "dask-scheduler": dask_address(state),
            "dask-workers": f"{state['dask_workers']} workers -> {dask_address(state)}",
        }[name]
        state_text = "healthy" if ok else ("running, not healthy" if pid else "stopped")
        print(f"{name:14} {state_text:22} pid {pid or '-':<8} {where}")
    return 0 if all_ok else 3


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "down", "status"):
        print(f"usage: infra/stack.sh up|down|status [{'|'.join(SERVICES)} ...]", file=sys.stderr)
        return 2
    command, names = argv[0], argv[1:]
    try:
        return {"up": up, "down": down, "status": status}[command](names)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
