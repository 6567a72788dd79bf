"""backup-retention: deleting backups and their .sha256 sidecars, in S3 in batches of
DeleteObjects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import botocore.exceptions

from tasks.engine import gated, io_task, run_action
from tasks.errors import ActionFailed, TargetError
from tasks.models import Action
from tasks.retention_rules import BackupKey, RetentionAction
from tasks.settings import BackupSet, S3Target
from tasks.storage import classify, s3_client, storage_errors

DELETE_BATCH = 1000  # S3's limit of keys per DeleteObjects call


def batches(items: list[str], size: int) -> Iterator[list[str]]:
    """items in consecutive lists of `size` (the last one shorter), in order; size >= 1."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


@io_task("delete-backups", timeout_seconds=600, retries=1)
def delete_backups(
    name: str, backup: BackupSet, s3: S3Target | None, keys: list[str]
) -> dict[str, str]:
    """Each backup with its KEY.sha256 sidecar; in S3 through DeleteObjects, 1000 keys a call.
    A key already gone counts as deleted, so a retry after a partial run is safe. A batch
    that fails is reported per key, and the next batches are still tried.

    Args:
        name: the [backups.NAME] set's name, for messages.
        backup: the set's inventory entry.
        s3: its [s3.NAME] target, or None for a directory.
        keys: the backups' keys (or file paths) to delete.

    Returns:
        What failed: backup key -> why (the OS's or S3's error, "its .sha256: ..." for the
        sidecar); empty when every one is gone.

    Raises:
        ConfigError: botocore refuses the s3 target's endpoint_url or region (refused at
            settings load already); refused or failed deletes, missing credentials
            included, are in the result."""
    failed: dict[str, str] = {}
    if s3 is None:
        for key in keys:
            try:
                Path(key).unlink(missing_ok=True)
                Path(key + ".sha256").unlink(missing_ok=True)
            except OSError as exc:
                failed[key] = f"{exc.strerror}: {exc.filename}"
        return failed
    wanted = set(keys)
    objects = [k for key in keys for k in (key, key + ".sha256")]
    with storage_errors(f"backups {name!r} in s3://{s3.bucket}"):
        client = s3_client(s3)
        for batch in batches(objects, DELETE_BATCH):
            try:
                answer = client.delete_objects(
                    Bucket=s3.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                # this batch only: the ones before it are deleted, the ones after are tried
                for key in batch:
                    owner = key.removesuffix(".sha256") if key not in wanted else key
                    failed.setdefault(owner, classify(exc))
                continue
            for error in answer.get("Errors", []):
                key = str(error.get("Key", ""))
                owner = key if key in wanted else key.removesuffix(".sha256")
                what = "" if owner == key else "its .sha256: "
                why = f"{what}{error.get('Code', '?')}: {error.get('Message', '')}".strip()
                failed[owner] = f"{failed[owner]}; {why}" if owner in failed else why
    return failed


def delete_approved(
    name: str,
    backup: BackupSet,
    s3: S3Target | None,
    approved: list[Action[RetentionAction, BackupKey]],
) -> None:
    """Delete the gated backups of `approved` in one delete_backups call (each with its
    .sha256), and give each action its own outcome: done, or failed with why (a store that
    cannot be reached fails them all). backup-retention and disk-space both delete this way.

    Args:
        name: the [backups.NAME] set's name.
        backup: the set's inventory entry.
        s3: its [s3.NAME] target, or None for a directory.
        approved: delete_backup actions the gate let through."""
    approved = gated(approved)
    if not approved:
        return
    try:
        failed = delete_backups(name, backup, s3, [a.args.key for a in approved])
    except TargetError as exc:
        failed = {a.args.key: str(exc) for a in approved}
    for action in approved:
        run_action(action, _deleted, failed.get(action.args.key))


def _deleted(error: str | None) -> str:
    if error is not None:
        raise ActionFailed(error)
    return "deleted, with its .sha256 if it had one"
