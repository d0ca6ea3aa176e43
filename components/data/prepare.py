"""The ``prepare`` stage: raw dataset -> client shards, test set, few-shot server set.

Run by DVC (see ``dvc.yaml``) as ``python -m components.data.prepare --profile P``;
``fedforget prepare`` validates first and then asks DVC to run it, so the
result is versioned in ``dvc.lock``. This module depends only on
``components/config/params.py``, ``components/data/`` and, for the clients'
model specs (``clients`` section), ``components/federation/hetero/profiles.py``
(the stage's deps).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from components.config.params import (
    DEFAULT_PROFILE,
    ConfigError,
    find_project_root,
    params_file,
    read_params,
    resolve_sections,
    validate,
)
from components.data.datasets import DataError, RawDataset, load_raw
from components.data.layout import DataConfig, prepare_data, validate_settings
from components.data.partition import client_ids

PER_CLIENT_MODELS = ("ensemble-distillation", "shared-base", "soft-labels")  # protocols that read `clients`


def data_config(params_path: Path, profile: str = DEFAULT_PROFILE) -> DataConfig:
    """The validated ``data`` section of ``params_path`` for ``profile``."""
    sections = resolve_sections(read_params(params_path), profile)
    return validate(DataConfig, sections.get("data") or {}, prefix="data")


def check(config: DataConfig, raw_dir: str | None = None) -> RawDataset:
    """Load the raw data and check the params against it, before anything is written.

    ``raw_dir`` (from ``FEDFORGET_RAW_DIR``) wins over ``data.raw_dir``.
    """
    raw = load_raw(config.dataset, raw_dir or config.raw_dir)
    validate_settings(config.prepare_settings(), raw)
    return raw


def client_models(params_path: Path, profile: str, config: DataConfig, raw: RawDataset) -> dict[str, Any] | None:
    """Each client's model spec and budget from the ``clients`` section, for the protocols that use it
    (``few-shot``: each client's device profile and fine-tuning mode).

    ``None`` when ``federate.protocol`` trains one global architecture (``weights``, ``splitfed``) or no
    architecture is declared. The data-derived sizes (classes, channels, image size) come from the raw
    data, as the flows derive them.
    """
    sections = resolve_sections(read_params(params_path), profile)
    section = sections.get("clients") or {}
    federate = sections.get("federate") or {}
    protocol = federate.get("protocol", "weights")
    if protocol == "few-shot":  # every client fine-tunes the same model, in its device's mode
        from components.federation.fewshot.devices import assign_devices

        default_mode = str((federate.get("fewshot") or {}).get("default_mode", "full"))
        devices = assign_devices(section.get("devices") or {}, section.get("device_groups") or [],
                                 str(section.get("device_assign", "round-robin")), client_ids(config.num_clients),
                                 default_mode)  # fmt: skip
        return {cid: {"device": d.device, "mode": d.mode} for cid, d in devices.items()}
    if protocol not in PER_CLIENT_MODELS or not section.get("architectures"):
        return None
    from components.federation.hetero.profiles import ClientProfiles
    from components.models.students import ModelSpec, data_derived_args

    ids = client_ids(config.num_clients)
    derived = ModelSpec("derived", data_derived_args(raw.num_classes, raw.train.images.shape[-1]))
    return ClientProfiles.from_params(section, ids).resolved(derived).client_records(ids)


def prepare(config: DataConfig, out_dir: Path, raw: RawDataset, models: dict[str, Any] | None = None) -> dict[str, Any]:
    return prepare_data(config.prepare_settings(), out_dir, raw, client_models=models)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.data.prepare", description=__doc__)
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    args = parser.parse_args(argv)
    try:
        root = find_project_root()
        config = data_config(params_file(root), args.profile)
        raw = check(config, os.environ.get("FEDFORGET_RAW_DIR"))
        models = client_models(params_file(root), args.profile, config, raw)
        out_dir = root / "data" / args.profile
        meta = prepare(config, out_dir, raw, models)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fed = meta["federation"]
    print(
        f"prepared {fed['dataset']} for profile {args.profile}: {len(fed['clients'])} clients, "
        f"{fed['test']['num_examples']} test, {meta['server']['few_shot']['num_examples']} "
        f"few-shot -> {out_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
