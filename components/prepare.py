"""The ``prepare`` stage: raw dataset -> client shards, test set, few-shot server set.

Run by DVC (see ``dvc.yaml``) as ``python -m components.prepare --profile P``;
``fedforget prepare`` validates first and then asks DVC to run it, so the
result is versioned in ``dvc.lock``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from components.config import DEFAULT_PROFILE, Config, ConfigError, Runtime, load_config
from components.data import DataError, RawDataset, load_raw, validate_settings


def load_raw_for(config: Config, runtime: Runtime) -> RawDataset:
    """The raw dataset named by the config (``FEDFORGET_RAW_DIR`` wins over params)."""
    return load_raw(config.data.dataset, runtime.raw_dir or config.data.raw_dir)


def check(config: Config, runtime: Runtime) -> RawDataset:
    """Everything that can be checked before anything is written."""
    raw = load_raw_for(config, runtime)
    validate_settings(config.data.prepare_settings(), raw)
    return raw


def prepare(config: Config, out_dir: Path, raw: RawDataset) -> dict[str, Any]:
    from components.data import prepare_data

    return prepare_data(config.data.prepare_settings(), out_dir, raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.prepare", description=__doc__)
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    args = parser.parse_args(argv)
    try:
        runtime = Runtime.from_env()
        config = load_config(runtime.params_path, args.profile)
        raw = check(config, runtime)
        meta = prepare(config, runtime.data_dir(args.profile), raw)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fed = meta["federation"]
    print(
        f"prepared {fed['dataset']} for profile {args.profile}: {len(fed['clients'])} clients, "
        f"{fed['test']['num_examples']} test, {meta['server']['few_shot']['num_examples']} "
        f"few-shot -> {runtime.data_dir(args.profile)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
