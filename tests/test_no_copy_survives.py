"""After a deletion, under each of the six protocols, nothing derived from the client survives.

What counts as derived is computed here, independently of the purge code, from the raw manifests (JSON)
before the deletion: the client's own records and shard, the server's objects of the rounds it took part
in, the personal states other clients recorded after it joined, and every global state that held it. After
the deletion every file of the store, the prepared data and the caches is hashed, and every registered
version's served weights too: none may match. (The tombstone lists the purged hashes as text; no object.)
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.core.serialize import state_from_bytes
from components.core.state import weights_digest
from tests.conftest import TINY_PARAMS, write_project

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

ARCHITECTURES = {"small": {"name": "cnn", "args": {"channels": [2, 4], "hidden": 8}},
                 "mlp": {"name": "mlp", "args": {"hidden": 16}}}  # fmt: skip
PROTOCOLS = {
    "weights": {},
    "splitfed": {"federate": {"protocol": "splitfed"}},
    "soft-labels": {
        "federate": {
            "protocol": "soft-labels",
            "soft_labels": {"server_epochs": 1, "forget_epochs": 1, "client_epochs": 1},
        },
        "clients": {
            "assign": "round-robin",
            "architectures": {
                "mlp": {"name": "mlp", "args": {"hidden": 8}},
                "global": {"name": TINY_PARAMS["model"]["name"], "args": TINY_PARAMS["model"]["args"]},
            },
        },
    },
    "ensemble-distillation": {
        "federate": {"protocol": "ensemble-distillation", "ensemble": {"epochs": 1, "forget_epochs": 1}},
        "clients": {"architectures": ARCHITECTURES},
    },
    "shared-base": {
        "federate": {"protocol": "shared-base", "shared_base": {"server_epochs": 1, "refit_epochs": 1}},
        "clients": {
            "architectures": {
                "linear": {"name": "cnn", "args": {"channels": [4, 8], "hidden": 16}},
                "mlp-head": {"name": "cnn-mlp-head", "args": {"channels": [4, 8], "hidden": 16, "head_hidden": 8}},
            }
        },
    },
    "few-shot": {
        "federate": {
            "protocol": "few-shot",
            "fewshot": {"steps": 3, "meta_steps": 2, "inner_steps": 1, "adapt_steps": 2},
        },
        "clients": {
            "devices": {"weak": {"mode": "linear-probe"}, "medium": {"mode": "meta"}, "strong": {"mode": "full"}}
        },
    },
}
TARGET = "client_01"


def merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in extra.items():
        out[section] = {**out.get(section, {}), **values}
    return out


@pytest.fixture(params=sorted(PROTOCOLS))
def project(request, tmp_path, monkeypatch):
    params = merged(TINY_PARAMS, PROTOCOLS[request.param])
    params["data"] = {**params["data"], "public_size": 120}
    params["federate"] = {**params["federate"], "prefit_teacher": False}
    root = write_project(tmp_path / "project", params)
    monkeypatch.setenv("FEDFORGET_PROJECT", str(root))
    monkeypatch.delenv("FEDFORGET_PARAMS", raising=False)
    monkeypatch.setenv("FEDFORGET_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return request.param, root


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def derived_from_target(store_root: Path, data_root: Path) -> tuple[set[str], set[str]]:
    """(file sha256s, weights digests) of everything that holds the target, from the raw manifests."""
    manifests = []
    for path in sorted(store_root.glob("federations/*/rounds/*/manifest.json")):
        manifests.append(json.loads(path.read_text()))
    rounds = sorted(manifests, key=lambda m: m["server_round"])
    joined = min(m["server_round"] for m in rounds if TARGET in [c["client_id"] for c in m["clients"]])
    hashes: set[str] = set()
    weights: set[str] = set()

    def add(ref: dict | None) -> None:
        if ref:
            hashes.add(ref["sha256"])

    for m in rounds:
        for c in m["clients"]:
            if c["client_id"] == TARGET:
                add(c.get("update"))
                add(c.get("upload"))
                for ref in (c.get("objects") or {}).values():
                    add(ref)
            elif m["server_round"] > joined:
                add((c.get("objects") or {}).get("personal"))
        add((m["index"]["entries"] or {}).get(TARGET))
        add((m.get("personal") or {}).get(TARGET))
        if m["server_round"] >= joined:
            for ref in (m.get("objects") or {}).values():
                add(ref)
            state = store_root / m["global"]["key"]
            hashes.add(m["global"]["sha256"])
            weights.add(weights_digest(state_from_bytes(state.read_bytes())[0]))
    for shard in [*store_root.glob(f"datasets/*/clients/{TARGET}.safetensors"),
                  *data_root.glob(f"**/{TARGET}.safetensors")]:  # fmt: skip
        hashes.add(sha(shard.read_bytes()))
    return hashes, weights


def test_no_object_derived_from_the_client_survives_its_deletion(project):
    from flows.federate import run_federate
    from flows.tracking import Tracker
    from flows.unlearn import unlearn

    name, root = project
    runtime = Runtime.from_env(root)
    store_root = Path(runtime.store)
    run_federate(project=str(root))
    tainted, tainted_weights = derived_from_target(store_root, root / "data")
    assert tainted and tainted_weights
    # Execute
    result = unlearn(client_id=TARGET, project=str(root), overrides={"unlearn.teacher": "none"})
    # Assert: no file anywhere holds what held the client
    assert result["guarantee"] in ("contributions", "replay"), name
    survivors = []
    for folder in (store_root, root / "data", runtime.cache_dir, runtime.state_dir):
        for path in folder.rglob("*") if folder.is_dir() else ():
            if path.is_file() and sha(path.read_bytes()) in tainted:
                survivors.append(str(path))
    assert survivors == [], f"{name}: {survivors}"
    # and the registry serves none of the states that held it
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    manifest = json.loads((store_root / tracker.version(result["version"]).tags["manifest_key"]).read_text())
    keys = sorted(state_from_bytes((store_root / manifest["global"]["key"]).read_bytes())[0])
    served = {v.version: tracker.served_weights(v.version, keys) for v in tracker.versions()}
    assert not {v for v, digest in served.items() if digest in tainted_weights}, name
    assert served[result["version"]] is not None  # the deletion's version serves its weights
