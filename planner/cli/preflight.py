"""Checks a command runs before any heavy work, so a bad output path, storage URL or cache folder
costs the user seconds, not the tables and sensitivities computed before it is found.

Each check raises :class:`~planner.errors.PlannerError` (one line, exit 2) and writes nothing but a
probe file it removes (and the cache folder itself, which the planner creates anyway).
"""
from __future__ import annotations

import os
from pathlib import Path

from planner.files.atomic import check_dir_target, check_file_target, check_writable, storage_errors, sweep_temps
from planner.files.paths import Input, Output, check_input_dir, check_input_file, check_outputs
from planner.search.config import PlanConfig
from planner.errors import PlannerError


def output_file(path: str | Path) -> Path:
    """``path`` is absent or a regular file (not a folder, symlink, FIFO or device) in a writable folder."""
    path = check_file_target(path)
    check_writable(path.parent)
    return path


def output_dir(path: str | Path) -> Path:
    """``path`` is absent or a real folder (not a symlink, file, FIFO or device) in a writable folder."""
    path = check_dir_target(path)
    check_writable(path.parent)
    return path


def cache_dir(cfg: PlanConfig) -> Path:
    """The cache folder (or, while it does not exist, its nearest existing parent) takes new files;
    nothing is created here: a run refused later for bad input leaves no cache folder behind."""
    from planner.files.cache import default_cache_dir  # imports torch: only when a plan really runs

    folder = cfg.cache_path or default_cache_dir()
    if folder.exists() and not folder.is_dir():
        raise PlannerError(f"cache folder {folder} exists and is not a directory; pass --cache-dir")
    if folder.is_dir():
        sweep_temps(folder)  # what killed runs left (a live writer's temps are kept)
    try:
        check_writable(folder)
    except PlannerError as err:
        raise PlannerError(f"the cache folder is not writable ({err}); pass --cache-dir or set "
                           "LOFTQ_PLANNER_CACHE") from None
    return folder


def storage(url: str) -> None:
    """An Optuna storage URL that parses, has a driver and connects (no tables are created here:
    Optuna creates them when the study opens)."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:  # noqa: BLE001 — any parse failure is the user's URL
        raise PlannerError(f"--storage {url!r} is not a database URL (e.g. sqlite:///studies.db or "
                           "postgresql://user@host/db)") from None
    shown = parsed.render_as_string(hide_password=True)
    # a server that drops packets would otherwise hold the check for the OS's TCP timeout (minutes)
    connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args)
    except Exception as err:  # noqa: BLE001 — unknown dialect, missing driver, bad options
        raise PlannerError(f"--storage {shown}: cannot use it ({_first_line(err)})") from None
    try:
        with engine.connect():
            pass
    except Exception as err:  # noqa: BLE001 — unreachable server, bad credentials, unopenable file
        raise PlannerError(f"--storage {shown}: cannot connect ({_first_line(err)})") from None
    finally:
        engine.dispose()


def plan_outputs(cfg: PlanConfig, out: str | Path | None = None) -> None:
    """Everything a plan run writes, checked before it starts: the plan (``out``, default
    ``cfg.out``), the Pareto files, that none of them is or replaces an input (the model, the
    calibration text, the study database), the storage (or the default SQLite study in the cache
    folder) and the cache folder."""
    out = cfg.out if out is None else out
    outputs = [Output(Path(out), "--out")]
    output_file(out)
    if cfg.pareto:
        for suffix in (".json", ".png"):
            output_file(f"{cfg.pareto}{suffix}")
            outputs.append(Output(Path(f"{cfg.pareto}{suffix}"), "--pareto"))
    check_outputs(outputs, plan_inputs(cfg))
    if cfg.storage:
        storage(cfg.storage)
    cache_dir(cfg)


def plan_inputs(cfg: PlanConfig) -> list[Input]:
    """What a plan run reads from the user's files: a model given as a path, the ``--data`` file
    and the ``--imatrix`` file (regular files: checked here), a SQLite study database."""
    inputs = []
    model = Path(cfg.model).expanduser()
    if os.path.lexists(model):
        inputs.append(Input(model, "model"))
    if cfg.data and not cfg.data.startswith("hf:") and os.path.lexists(cfg.data):
        inputs.append(Input(check_input_file(cfg.data, "data file"), "calibration text (--data)"))
    if cfg.imatrix:
        inputs.append(Input(check_input_file(cfg.imatrix, "imatrix"), "importance matrix (--imatrix)"))
    db = sqlite_path(cfg.storage)
    if db is not None:
        inputs.append(Input(db, "study database (--storage)"))
    return inputs


def sqlite_path(url: str | None) -> Path | None:
    """The database file of a ``sqlite:///PATH`` storage URL (None for other URLs)."""
    if not url or not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///"):].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def finetune_io(folder: str | Path, out: Path, data: str | None) -> None:
    """``finetune DIR --out OUT``: OUT is neither DIR itself nor over any part of it (plan, backbone,
    adapter, exports; an earlier finetune output inside DIR may be replaced), nor the --data file."""
    from planner.artifact.layout import MEMBERS

    inputs = [Input(check_input_dir(folder, "materialized folder"), "materialized folder", MEMBERS)]
    if data and not data.startswith("hf:") and os.path.lexists(data):
        inputs.append(Input(check_input_file(data, "data file"), "training text (--data)"))
    check_outputs([Output(out, "--out")], inputs)
