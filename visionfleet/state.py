"""Start-time checks of the shared state, and the registry every entry point opens.

A command that needs state calls :func:`open_registry` (or :func:`check_state` first): an
object store that cannot be reached or written, or a database that is down, ends the
command at once with one message naming the setting, what was expected and the server's
own reason (``NoSuchBucket``, ``InvalidAccessKeyId``, the database's text), instead of a
traceback from deep inside a request.

The embedded default (a local home, no ``$VISIONFLEET_STORE`` / ``$VISIONFLEET_DB``) needs no
check: its folders are created on use, as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from visionfleet.settings import ENV_STORE

if TYPE_CHECKING:  # pragma: no cover
    from visionfleet.registry import Registry
    from visionfleet.settings import Settings

__all__ = ["StateError", "check_state", "open_registry"]


class StateError(RuntimeError):
    """The configured store or database cannot be used; the message says which and why."""


def _store_setting(settings: "Settings", area: str) -> tuple[str, str]:
    """(the variable that placed ``area``, its value)."""
    if area in settings.store_overrides:
        return f"{ENV_STORE}_{area.upper()}", settings.store_overrides[area]
    return ENV_STORE, settings.store


def check_state(settings: "Settings", areas: Sequence[str] = ("registry",), *, db: bool | None = None) -> None:
    """Probe the store of each area (write, read back, delete) and open the database.

    Args:
        settings: where state lives.
        areas: the store areas the command uses (``Settings.store_uri``).
        db: open the database too; ``None``: when the registry keeps its metadata there
            (an object store or a configured ``$VISIONFLEET_DB``).
    Raises:
        StateError: a store or the database cannot be used (the message says why).
    """
    from visionfleet.registry import uses_db

    _check_stores(settings, areas)
    if db is None:
        db = uses_db(settings)
    if db:
        _open_db(settings).dispose()


def _check_stores(settings: "Settings", areas: Sequence[str]) -> None:
    from visionfleet.store import StoreError, open_store

    for area in areas:
        uri = settings.store_uri(area)
        if "://" not in uri:
            continue  # a folder on this node: created on use
        name, value = _store_setting(settings, area)
        try:
            open_store(uri).check()
        except StoreError as exc:
            raise StateError(
                f"Got {value} for {name}; expected a reachable bucket that these credentials may write "
                f"(check the bucket name, AWS_ENDPOINT_URL and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): "
                f"{_reason(exc)}") from None


def _open_db(settings: "Settings"):
    from visionfleet.db import DatabaseError, open_db

    try:
        return open_db(settings.db_url)
    except DatabaseError as exc:
        raise StateError(str(exc)) from None  # already "Got <redacted URL> for VISIONFLEET_DB; expected …"


def open_registry(settings: "Settings", *, check: bool = True) -> "Registry":
    """The registry of ``settings`` (``Registry.from_settings``), after :func:`check_state`.

    Raises:
        StateError: the registry's store or database cannot be used.
    """
    from visionfleet.db import DatabaseError
    from visionfleet.registry import Registry, uses_db
    from visionfleet.store import StoreError

    database = None
    if check:
        _check_stores(settings, ("registry",))
        if uses_db(settings):
            database = _open_db(settings)  # opened (and migrated) once, then handed to the registry
    try:
        return Registry.from_settings(settings, db=database)
    except DatabaseError as exc:
        raise StateError(str(exc)) from None
    except StoreError as exc:
        name, value = _store_setting(settings, "registry")
        raise StateError(f"Got {value} for {name}; expected a local path or s3://bucket/prefix: {exc}") from None


# pyarrow reports the AWS SDK's error enum; operators search for the S3 API's own code names.
_S3_CODES = {
    "NO_SUCH_BUCKET": "NoSuchBucket",
    "INVALID_ACCESS_KEY_ID": "InvalidAccessKeyId",
    "ACCESS_DENIED": "AccessDenied",
    "SIGNATURE_DOES_NOT_MATCH": "SignatureDoesNotMatch",
    "NETWORK_CONNECTION": "no answer from the endpoint",
}


def _reason(exc: BaseException) -> str:
    """The store's own words, led by the S3 error code (``NoSuchBucket: ...``)."""
    text = " ".join(str(exc).split())
    for enum, name in _S3_CODES.items():
        if enum in text or name in text:
            return f"{name}: {text[:600]}"
    return text[:600]
