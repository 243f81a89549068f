"""MLflow model registry over checkpoint pointers: register, tag verdicts, promote behind a gate, find the champion.

A model version's artifacts are a pointer (the checkpoint URI, manifest digest, sizes) plus the manifest
itself, a few KB: the weights stay in checkpoint storage and are never copied into MLflow (logging full
base weights per adapter is how registries grow to terabytes). Works with `sqlite:///...` and `http://`
tracking URIs alike; `tracking_uri=None` means $MLFLOW_TRACKING_URI / MLflow's default.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from infra.storage import Manifest, open_storage

CHAMPION = "champion"
POINTER_DIR = "checkpoint_pointer"
TAG_URI = "checkpoint_uri"
TAG_GATE = "gate_passed"
ANY = "*"  # promote_if_passed(gated_against=ANY): the caller does not say what its gate compared against


def _client(tracking_uri: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _manifest_dict(manifest: Manifest | Mapping[str, Any] | None, checkpoint_uri: str) -> dict[str, Any]:
    if manifest is None:
        # The URI is the checkpoint's own root, so its manifest is at key "" + manifest.json.
        return open_storage(checkpoint_uri).read_manifest("").to_dict()
    return manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)


def register_checkpoint(
    run_id: str,
    checkpoint_uri: str,
    name: str,
    tags: Mapping[str, Any] | None = None,
    *,
    manifest: Manifest | Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Log the pointer + manifest into the run and create a model version for it; returns the version.

    Without `manifest`, it is read from the checkpoint (which must be committed), so only committed
    checkpoints can be registered.
    """
    client = _client(tracking_uri)
    man = _manifest_dict(manifest, checkpoint_uri)
    digest = hashlib.sha256(json.dumps(man, sort_keys=True).encode()).hexdigest()
    pointer = {
        "checkpoint_uri": checkpoint_uri,
        "manifest_sha256": digest,
        "total_bytes": man.get("total_bytes"),
        "files": len(man.get("files", {})),
    }
    artifact_dir = f"{POINTER_DIR}/{digest[:12]}"
    client.log_dict(run_id, pointer, f"{artifact_dir}/pointer.json")
    client.log_dict(run_id, man, f"{artifact_dir}/manifest.json")
    try:
        client.create_registered_model(
            name, description="tuneloop checkpoints (pointers to checkpoint storage)"
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    all_tags = {
        TAG_URI: checkpoint_uri,
        "manifest_sha256": digest,
        "total_bytes": str(man.get("total_bytes")),
    }
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    mv = client.create_model_version(name, f"runs:/{run_id}/{artifact_dir}", run_id=run_id, tags=all_tags)
    return str(mv.version)


def set_verdict_tags(
    name: str, version: str | int, verdict: Mapping[str, Any], *, tracking_uri: str | None = None
) -> None:
    """Record an eval verdict on the version: each key becomes tag `verdict.<key>` (dicts as JSON)."""
    client = _client(tracking_uri)
    for k, v in verdict.items():
        value = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
        client.set_model_version_tag(name, str(version), f"verdict.{k}", value)


def promote_if_passed(
    name: str,
    version: str | int,
    gate_passed: bool,
    alias: str = CHAMPION,
    *,
    tracking_uri: str | None = None,
    gated_against: str | None = ANY,
) -> bool:
    """Tag the gate outcome; move `alias` to this version only when the gate passed. Returns whether it moved.

    `gated_against`: the version holding `alias` that the gate compared this one with (None: there was none,
    the gate was against the base). A gate against the base, or against a champion that has been replaced
    since, says nothing about the current champion, so then the alias stays (tag `promotion_skipped`).
    MLflow has no compare-and-set on aliases: a promotion racing this check between read and write can
    still win; retrains serialize on a Prefect concurrency slot for that reason.
    """
    client = _client(tracking_uri)
    client.set_model_version_tag(name, str(version), TAG_GATE, "true" if gate_passed else "false")
    if not gate_passed:
        return False
    previous = _alias_version(client, name, alias)
    if gated_against != ANY and previous != gated_against:
        against = f"version {gated_against}" if gated_against else "the base model"
        client.set_model_version_tag(name, str(version), "promotion_skipped",
                                     f"gate compared against {against}, but {alias} is now version {previous}")
        return False
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), f"promoted_to.{alias}", "true")
    if previous is not None and previous != str(version):
        client.set_model_version_tag(name, str(version), f"previous.{alias}", previous)
    return True


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None  # no such model, or the alias was never set
        raise


def get_champion(
    name: str, alias: str = CHAMPION, *, tracking_uri: str | None = None
) -> tuple[str, str] | None:
    """(version, checkpoint_uri) of the version holding `alias`, or None if there is none yet."""
    client = _client(tracking_uri)
    version = _alias_version(client, name, alias)
    if version is None:
        return None
    mv = client.get_model_version(name, version)
    return version, mv.tags[TAG_URI]
