"""The whole infra/ stack (SeaweedFS, MLflow server, Prefect server) for tests."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_ports

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Stack:
    """A running ``infra/stack.sh`` stack in a folder of its own, on free ports."""

    directory: Path
    env_file: Path
    settings: dict[str, str]

    @classmethod
    def create(cls, directory: Path) -> Stack:
        s3, mlflow, prefect = free_ports(3)
        while True:  # four consecutive internal ports (and their gRPC twins) for SeaweedFS
            (base,) = free_ports(1)
            if base + 10003 <= 65535 and all(
                _free(p) for p in (base + 1, base + 2, base + 3, base + 10001, base + 10002, base + 10003)
            ):
                break
        settings = {
            "FEDFORGET_STACK_DIR": str(directory),
            "FEDFORGET_STACK_ENV": str(directory / "stack.env"),
            "FEDFORGET_STACK_S3_PORT": str(s3),
            "FEDFORGET_STACK_MLFLOW_PORT": str(mlflow),
            "FEDFORGET_STACK_PREFECT_PORT": str(prefect),
            "FEDFORGET_STACK_SEAWEED_PORT": str(base),
        }
        return cls(directory, directory / "stack.env", settings)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
        result = subprocess.run(
            [str(REPO / "infra" / "stack.sh"), *args], env={**env, **self.settings},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"stack.sh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def client_env(self) -> dict[str, str]:
        """The variables ``stack.env`` exports (what a user gets by sourcing it)."""
        values = {}
        for line in self.env_file.read_text().splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export ") :].partition("=")
                values[key] = value
        return values


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
