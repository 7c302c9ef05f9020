"""The `visionfleet` command: the root app only adds the area sub-apps (STYLE 10).

Area modules keep heavy imports (torch, ray) inside their commands, so `--help` and
every light command start fast and the import rule holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from visionfleet.cli import data, demo, models, predict, serve, train

__all__ = ["app", "main"]

app = typer.Typer(
    name="visionfleet",
    help="Take vision models to production and to the edge: train, optimize, serve, A/B test, ship.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    home: Annotated[
        Optional[Path],
        typer.Option("--home", envvar="VISIONFLEET_HOME", help="state dir (default ./.visionfleet)"),
    ] = None,
) -> None:
    import os

    if home is not None:
        os.environ["VISIONFLEET_HOME"] = str(home.expanduser().resolve())


app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")
app.add_typer(serve.app, name="serve")
app.add_typer(train.app)
app.add_typer(predict.app)
app.add_typer(demo.app)

from visionfleet.cli import ab  # noqa: E402

app.add_typer(ab.app, name="ab")

from visionfleet.cli import tensorrt  # noqa: E402

app.add_typer(tensorrt.app, name="tensorrt")

from visionfleet.cli import optimize as _optimize  # noqa: E402

app.add_typer(_optimize.app)

from visionfleet.cli import bench as _bench  # noqa: E402

app.add_typer(_bench.app)

from visionfleet.cli import infer as _infer  # noqa: E402

app.add_typer(_infer.app)


from visionfleet.cli import edge as _edge  # noqa: E402

app.add_typer(_edge.app, name="edge")

from visionfleet.cli import fleet as _fleet  # noqa: E402

app.add_typer(_fleet.app, name="fleet")

from visionfleet.cli import loop as _loop  # noqa: E402
from visionfleet.cli import scenario as _scenario  # noqa: E402

app.add_typer(_loop.monitor_app)
app.add_typer(_loop.label_app, name="label")
app.add_typer(_loop.retrain_app, name="retrain")
app.add_typer(_loop.report_app)
app.add_typer(_scenario.app, name="scenario")

from visionfleet.cli import tune as _tune  # noqa: E402

app.add_typer(_tune.app, name="tune")

from visionfleet.cli import cluster as _cluster  # noqa: E402

app.add_typer(_cluster.app, name="cluster")


def main() -> None:
    app()
