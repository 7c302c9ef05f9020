"""Over-the-air updates verified with TUF (``tuf.ngclient``), decided by cohort, installed safely.

One check: refresh the TUF metadata (root → timestamp → snapshot → targets, every
signature, version and expiry checked against what this device trusted before), look
up the channel ``<model>/<target>/bundle.tar``, read its *signed* custom metadata
(version, rollout percentage, halted flag) and decide. Only then is the archive
downloaded, and ``tuf.ngclient`` checks its length and sha256 against the signed
targets metadata before the agent sees a byte of it.

Any failure — server unreachable, metadata expired, a signature that does not verify,
a version that went backwards, a bundle whose hash does not match — ends the check
with a reason and changes nothing: the device keeps serving its current model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.durable import atomic_write
from edge_agent.rollout import in_rollout

__all__ = ["OtaClient", "OtaDecision", "OtaFailure", "channel_path", "TRUSTED_ROOT"]

TRUSTED_ROOT = "trusted_root.json"


def channel_path(model: str, target: str) -> str:
    """The TUF target path of a model's bundle for one device target."""
    from visionfleet.spec import validate_name
    from visionfleet.targets import Target

    validate_name(model)
    Target(target)
    return f"{model}/{target}/bundle.tar"


class OtaFailure(RuntimeError):
    """A check or download that could not complete. ``kind``: unreachable or refused."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class OtaDecision:
    """What a check found. ``action``: install, up_to_date, not_in_cohort, halted, older, no_channel."""

    action: str
    custom: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    target_info: Any = None  # the verified tuf TargetFile, for download

    @property
    def version(self) -> int | None:
        v = self.custom.get("version")
        return int(v) if v is not None else None


class OtaClient:
    """TUF client of one device for one channel (model × target).

    Args:
        home: the agent home; metadata lives in ``<home>/tuf``, downloads in ``<home>/downloads``.
        server: base URL of the visionfleet server (serves ``/tuf/metadata`` and ``/tuf/targets``).
        model, target, device_id: the channel and the device (for its cohort).
        root: the trusted root metadata to start from (first run); afterwards the stored one.
    """

    def __init__(self, home: str | os.PathLike[str], server: str, *, model: str, target: str, device_id: str,
                 root: bytes | None = None, timeout: float = 15.0) -> None:
        self.home = Path(home)
        self.dir = self.home / "tuf"
        self.metadata_dir = self.dir / "metadata"
        self.downloads = self.home / "downloads"
        self.server = server.rstrip("/")
        self.model, self.target, self.device_id = model, target, device_id
        self.path = channel_path(model, target)
        self.timeout = timeout
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.downloads.mkdir(parents=True, exist_ok=True)
        if root is not None:
            self.trust(root)

    # ------------------------------------------------------------------ trust
    @property
    def trusted_root_path(self) -> Path:
        return self.dir / TRUSTED_ROOT

    def has_root(self) -> bool:
        return self.trusted_root_path.is_file()

    def trust(self, root: bytes) -> None:
        """Install the trust anchor (first run). A different anchor than the stored one is refused.

        Raises:
            ValueError: not root metadata, or another root is already trusted.
        """
        from tuf.api.metadata import Metadata, Root

        try:
            md = Metadata[Root].from_bytes(root)
            if md.signed.type != "root":
                raise ValueError("not root metadata")
            md.verify_delegate("root", md)  # self-signed by its threshold of root keys
        except Exception as exc:  # noqa: BLE001 - tuf raises several types for bad input
            raise ValueError(f"Got an invalid TUF root: {exc}") from None
        if self.has_root():
            if self.trusted_root_path.read_bytes() != root:
                raise ValueError(
                    f"a different TUF root is already trusted in {self.trusted_root_path}; the device follows root "
                    "rotations by itself — delete the agent home to re-provision it"
                )
            return
        atomic_write(self.trusted_root_path, root)

    # ------------------------------------------------------------------ check and download
    def _updater(self):
        from tuf.ngclient import Updater

        from edge_agent.net import UrllibFetcher

        if not self.has_root():
            raise OtaFailure("refused", f"no trusted TUF root in {self.trusted_root_path}; run with --root ROOT.json once")
        return Updater(
            str(self.metadata_dir),
            f"{self.server}/tuf/metadata/",
            target_dir=str(self.downloads),
            target_base_url=f"{self.server}/tuf/targets/",
            fetcher=UrllibFetcher(self.timeout),
            # The stored anchor, every time: the updater walks root rotations from it
            # (cached versions first), so a corrupted cache cannot replace the anchor.
            bootstrap=self.trusted_root_path.read_bytes(),
        )

    def check(self, current_bundle: str | None, current_version: int | None) -> OtaDecision:
        """Refresh the verified metadata and decide what to do with the channel's bundle.

        Raises:
            OtaFailure: unreachable server (``kind="unreachable"``) or metadata that TUF
                refused (``kind="refused"``: expired, bad signature, rollback, mix-and-match).
        """
        from tuf.api import exceptions as tex

        try:
            up = self._updater()
            up.refresh()
            info = up.get_targetinfo(self.path)
        except tex.DownloadError as exc:
            raise OtaFailure("unreachable", f"{type(exc).__name__}: {exc}") from None
        except (tex.RepositoryError, ValueError) as exc:
            raise OtaFailure("refused", f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise OtaFailure("unreachable", f"{type(exc).__name__}: {exc}") from None
        if info is None:
            return OtaDecision("no_channel", reason=f"nothing published at {self.path}")
        custom = dict(info.custom or {})
        try:
            version = int(custom["version"])
            rollout = float(custom.get("rollout", 0.0))
            bundle_id = str(custom["bundle_id"])
        except (KeyError, TypeError, ValueError):
            raise OtaFailure("refused", f"signed metadata of {self.path} lacks version/rollout/bundle_id") from None
        if custom.get("model") != self.model or custom.get("target") != self.target:
            raise OtaFailure("refused", f"{self.path} is signed for {custom.get('model')}/{custom.get('target')}")
        if current_bundle == bundle_id:
            return OtaDecision("up_to_date", custom, f"already on {bundle_id}")
        if custom.get("halted"):
            return OtaDecision("halted", custom, f"rollout of {bundle_id} halted: {custom.get('halt_reason') or ''}")
        if current_version is not None and version < current_version and not custom.get("downgrade"):
            return OtaDecision("older", custom, f"offered version {version} < current {current_version}")
        if not in_rollout(self.device_id, self.model, max(0.0, min(100.0, rollout))):
            return OtaDecision("not_in_cohort", custom, f"rollout {rollout:g}% does not cover this device")
        return OtaDecision("install", custom, f"{bundle_id} at rollout {rollout:g}%", info)

    def download(self, decision: OtaDecision) -> Path:
        """Download the decided bundle; TUF verifies its length and sha256 while it lands.

        Raises:
            OtaFailure: unreachable, or the file does not match the signed hash (``refused``).
        """
        from tuf.api import exceptions as tex

        if decision.action != "install" or decision.target_info is None:
            raise ValueError(f"Got a {decision.action} decision; expected install")
        dest = self.downloads / f"{decision.custom['bundle_id']}.tar"
        try:
            up = self._updater()
            up.refresh()
            info = up.get_targetinfo(self.path)
            if info is None or info.hashes != decision.target_info.hashes:
                raise OtaFailure("unreachable", "the channel changed between check and download; retrying later")
            cached = up.find_cached_target(info, str(dest))
            return Path(cached) if cached else Path(up.download_target(info, str(dest)))
        except tex.DownloadError as exc:
            raise OtaFailure("unreachable", f"{type(exc).__name__}: {exc}") from None
        except tex.RepositoryError as exc:  # LengthOrHashMismatchError: a tampered bundle
            dest.unlink(missing_ok=True)
            raise OtaFailure("refused", f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise OtaFailure("unreachable", f"{type(exc).__name__}: {exc}") from None
