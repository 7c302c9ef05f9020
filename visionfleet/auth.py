"""The admin bearer token: ``$VISIONFLEET_ADMIN_TOKEN`` or ``<state>/admin_token``.

``visionfleet serve up`` creates the file (mode 0600) with a random token the first
time; the CLI's admin commands read it from there, other clients from the operator.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from visionfleet.settings import Settings

__all__ = ["admin_token", "ENV_TOKEN"]

ENV_TOKEN = "VISIONFLEET_ADMIN_TOKEN"


def admin_token(settings: Settings, *, create: bool = False) -> str | None:
    """The configured token; with ``create``, make and store one when there is none."""
    env = os.environ.get(ENV_TOKEN)
    if env:
        return env.strip()
    path = Path(settings.home) / "admin_token"
    if path.is_file():
        return path.read_text().strip() or None
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
