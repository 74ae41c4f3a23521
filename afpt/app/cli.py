"""The ``afpt`` command: a Hydra app over ``conf/`` (installed as ``afpt.conf``) that runs one stage.

Exit status: 0 done; 2 bad input or an unwritable disk, in one line (``afpt: error: ...``) with the run
directory left as it was, or a configuration Hydra refuses (an unknown key, group option or override syntax,
in Hydra's own words); 143 stopped by SIGTERM after saving a resumable checkpoint.
"""

from __future__ import annotations

import errno
import logging
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from afpt.app.console import drop_lightning_console_handler, log_to_files, quiet_library_noise, summary_block
from afpt.app.rundir import check_run_name, discard, fail, is_fresh, is_rank_zero, run_lock
from afpt.errors import AfptError

log = logging.getLogger("afpt")

# Errors of the disk rather than of afpt: reported in one line, naming the file.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
SIGTERM_EXIT = 128 + 15
# Whether Hydra composed a config and called the app (so an exit 1 is the app's, not a refused configuration).
APP_STARTED = {"value": False}

# conf/hydra/launcher/submitit_{slurm,local}.yaml replace the plugin's configs of the same name on purpose (to
# derive the resources from the trainer); Hydra 1.3 still validates them against the plugin's schema and
# warns once per composition that this matching is deprecated.
warnings.filterwarnings("ignore", message=r"\n'hydra/launcher/submitit_\w+' is validated against ConfigStore schema")


def _disk_message(err: OSError) -> str:
    where = f"cannot write {err.filename!r}" if err.filename else "cannot write the run's files"
    return f"{where}: {err.strerror or err}"


@hydra.main(version_base="1.3", config_path="pkg://afpt.conf", config_name="config")
def app(cfg: DictConfig) -> float | None:
    """The Hydra app: runs ``cfg.stage``; returns ``cfg.optimized_metric`` for sweepers."""
    APP_STARTED["value"] = True
    quiet_library_noise()
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from afpt.app.stages import run_stage

    drop_lightning_console_handler()

    run_dir = Path(cfg.paths.run_dir)
    fresh = is_fresh(run_dir)
    try:
        check_run_name(cfg.name)
        with run_lock(run_dir):
            metrics = run_stage(cfg.stage.name, cfg)
    except AfptError as err:
        log_to_files(log, str(err))
        if fresh:
            discard(run_dir)
        fail(str(err))
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        fail(_disk_message(err))  # not logged: the log file may be on the disk that failed
    except SIGTERMException:
        resume = "" if cfg.stage.name == "pipeline" else " ckpt_path=last"
        message = f"stopped by SIGTERM; a resumable checkpoint is saved: rerun with name={run_dir.name}{resume}"
        log_to_files(log, message)
        fail(message, SIGTERM_EXIT)
    if metrics is not None and is_rank_zero():
        print(summary_block(cfg.stage.name, run_dir, metrics), flush=True)
    key = cfg.get("optimized_metric")
    return float(metrics[key]) if key and key in metrics else None


def main() -> None:
    """The ``afpt`` command. Hydra reports a configuration it cannot compose (an unknown key or option) and exits
    1; afpt makes that exit 2, as for every other bad input."""
    APP_STARTED["value"] = False
    try:
        app()
    except SystemExit as done:
        if done.code == 1 and not APP_STARTED["value"]:
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
