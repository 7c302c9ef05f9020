"""A/B experiment state in the shared database (migration ``0004_experiments``).

* ``experiments``: one row per experiment, its :class:`~serve_apps.config.ExperimentConfig`
  as JSON (config, status, allocation, decision) in ``doc``, and ``rev``, a revision counter.
  Every state change (start, re-weight, stop, decision) is a compare-and-set on ``rev``:
  ``UPDATE ... WHERE name = :name AND rev = :seen``. Of two coordinators that read the same
  revision only one update matches a row; the other gets ``False`` and must re-read, so a
  decision (and the alias move it triggers) is applied once.
* ``experiment_timeline``: the cumulative per-arm snapshots, in insertion order (the input of
  the report).

Nothing here knows pydantic: documents go in and out as dicts. An older home kept each
experiment as ``<home>/experiments/<name>/experiment.json`` + ``timeline.jsonl``;
:meth:`ExperimentStore.import_legacy` copies those in once (an experiment already in the
database is left alone, so it is idempotent).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from visionfleet.db import Database, open_db

__all__ = ["experiments_metadata", "experiments", "experiment_timeline", "StoredExperiment", "ExperimentStore",
           "open_experiments"]

experiments_metadata = sa.MetaData()
experiments = sa.Table(
    "experiments", experiments_metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("model", sa.String(200), nullable=False, index=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Column("rev", sa.Integer, nullable=False),
    sa.Column("updated_ts", sa.Float, nullable=False),
)
# At most one running experiment per model, enforced by the database itself.
sa.Index("experiments_one_running_per_model", experiments.c.model, unique=True,
         sqlite_where=experiments.c.status == "running", postgresql_where=experiments.c.status == "running")
experiment_timeline = sa.Table(
    "experiment_timeline", experiments_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("row", sa.Text, nullable=False),
)


@dataclass(frozen=True)
class StoredExperiment:
    """One experiment's document and the revision it was read at."""

    name: str
    doc: dict[str, Any]
    rev: int


class ExperimentStore:
    """Experiments and their timelines in ``db`` (a :class:`Database` or a URL)."""

    def __init__(self, db: Database | str) -> None:
        self.db = open_db(db) if isinstance(db, str) else db

    # ------------------------------------------------------------------ reads
    def get(self, name: str) -> StoredExperiment | None:
        with self.db.engine.connect() as c:
            r = c.execute(sa.select(experiments.c.doc, experiments.c.rev).where(experiments.c.name == name)).first()
        return None if r is None else StoredExperiment(name, json.loads(r.doc), int(r.rev))

    def names(self) -> list[str]:
        with self.db.engine.connect() as c:
            return sorted(r.name for r in c.execute(sa.select(experiments.c.name)))

    def all(self, status: str | None = None) -> list[StoredExperiment]:
        q = sa.select(experiments.c.name, experiments.c.doc, experiments.c.rev).order_by(experiments.c.name)
        if status is not None:
            q = q.where(experiments.c.status == status)
        with self.db.engine.connect() as c:
            return [StoredExperiment(r.name, json.loads(r.doc), int(r.rev)) for r in c.execute(q)]

    def timeline(self, name: str) -> list[dict[str, Any]]:
        q = sa.select(experiment_timeline.c.row).where(experiment_timeline.c.name == name).order_by(experiment_timeline.c.id)
        with self.db.engine.connect() as c:
            return [json.loads(r.row) for r in c.execute(q)]

    # ------------------------------------------------------------------ writes
    def create(self, doc: dict[str, Any]) -> bool:
        """Insert a new experiment at revision 1; False when the name is taken or, for a
        running one, its model already has a running experiment (a partial unique index, so
        two coordinators racing cannot both start one)."""
        try:
            with self.db.engine.begin() as c:
                c.execute(experiments.insert().values(**_row(doc), rev=1))
            return True
        except sa.exc.IntegrityError:
            return False

    def update(self, doc: dict[str, Any], rev: int) -> bool:
        """Write ``doc`` if the experiment is still at ``rev`` (compare-and-set); True when it won."""
        with self.db.engine.begin() as c:
            n = c.execute(
                experiments.update()
                .where(experiments.c.name == doc["name"], experiments.c.rev == rev)
                .values(**_row(doc), rev=rev + 1)
            ).rowcount
        return n == 1

    def delete(self, name: str, rev: int) -> bool:
        """Remove an experiment still at ``rev`` (a start whose deployment failed)."""
        with self.db.engine.begin() as c:
            n = c.execute(experiments.delete().where(experiments.c.name == name, experiments.c.rev == rev)).rowcount
            if n:
                c.execute(experiment_timeline.delete().where(experiment_timeline.c.name == name))
        return n == 1

    def append(self, name: str, row: dict[str, Any]) -> None:
        with self.db.engine.begin() as c:
            c.execute(experiment_timeline.insert().values(name=name, at=float(row.get("at", time.time())), row=json.dumps(row)))

    def import_legacy(self, folder: Path) -> list[str]:
        """Copy ``<folder>/<name>/experiment.json`` + ``timeline.jsonl`` in; returns the names imported.

        An experiment already in the database is skipped, so running it twice imports nothing new.
        The experiment and its timeline go in one transaction.
        """
        done: list[str] = []
        if not folder.is_dir():
            return done
        for p in sorted(folder.glob("*/experiment.json")):
            doc = json.loads(p.read_text())
            tl = p.with_name("timeline.jsonl")
            rows = [line for line in tl.read_text().splitlines() if line.strip()] if tl.is_file() else []
            try:
                with self.db.engine.begin() as c:
                    c.execute(experiments.insert().values(**_row(doc), rev=1))
                    if rows:
                        c.execute(experiment_timeline.insert(), [
                            {"name": doc["name"], "at": float(json.loads(r).get("at", 0.0)), "row": r} for r in rows])
                done.append(doc["name"])
            except sa.exc.IntegrityError:
                continue  # imported before (or started here under the same name): the database wins
        return done


def _row(doc: dict[str, Any]) -> dict[str, Any]:
    return {"name": doc["name"], "model": doc["model"], "status": doc.get("status", "running"),
            "doc": json.dumps(doc), "updated_ts": time.time()}


def open_experiments(settings) -> ExperimentStore:  # noqa: ANN001 - visionfleet.settings.Settings
    """The experiment store of ``settings`` (its ``db_url``), with the home's legacy files imported."""
    store = ExperimentStore(settings.db_url)
    store.import_legacy(Path(settings.home) / "experiments")
    return store

