"""What the ``afpt`` command prints: known, harmless library noise silenced at its source, and a closing summary.

Silenced (each is harmless for afpt's use, and repeated per stage otherwise):

- Lightning's "💡 Tip" lines advertising other packages (litlogger, litmodels);
- Lightning's duplicate console handler on the ``lightning`` logger (Hydra's root handler already prints
  every line, and writes it to ``<run dir>/cli.log``);
- Lightning's ``isinstance(treespec, LeafSpec)`` deprecation warning (Lightning against a newer torch);
- lm-eval's "``pretrained`` model kwarg is not of type str" warning (afpt hands HFLM a loaded model on
  purpose: its own device placement, no accelerate launch);
- torchao's import-time warnings when it is installed without kernels for this platform, and torch's
  ``_pytree`` Enum deprecation log lines it triggers;
- the save/load progress bars of transformers, datasets and huggingface_hub (short work); Lightning's own
  training bar (one per stage) stays.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path


class _DropMessages(logging.Filter):
    """A logging filter that drops records whose message contains any of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_library_noise() -> None:
    """Silence the known, harmless noise listed in this module's docstring (call before the libraries load)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("💡 Tip"))
    logging.getLogger("lm_eval.models.huggingface").addFilter(_DropMessages("model kwarg is not of type"))
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torchao.kernel.intmm").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def log_to_files(logger: logging.Logger, message: str) -> None:
    """Write ``message`` as an error to the log files of the root logger (the run's ``cli.log``) only: the console
    shows an error once, as the ``afpt: error:`` line on stderr."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def drop_lightning_console_handler() -> None:
    """Remove the console handler Lightning puts on the ``lightning`` logger (once Lightning is imported):
    its records reach Hydra's root handler anyway, so every line printed twice."""
    logger = logging.getLogger("lightning")
    for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
        logger.removeHandler(handler)


def summary_block(stage: str, run_dir: os.PathLike | str, metrics: Mapping[str, object] | None) -> str:
    """The few lines the command ends with: the stage, its run directory, its report (if any) and the headline
    numbers of a study."""
    run_dir = Path(run_dir)
    lines = ["", f"afpt {stage}: done, run directory {run_dir}"]
    report = run_dir / "report" / "report.md"
    if report.is_file():
        lines.append(f"report: {report}")
    numbers = metrics or {}
    wanted = [
        k for k in ("af/adapt/mean_ppl_char", "baseline/adapt/mean_ppl_char", "adapt_ppl_char_gain") if k in numbers
    ]
    if wanted:
        lines.append("adaptation, perplexity per character (mean of the new languages; lower is better):")
        lines += [f"  {key:<30} {float(numbers[key]):.4f}" for key in wanted]
    elif "val/loss" in numbers:
        lines.append(f"validation loss: {float(numbers['val/loss']):.4f}")
    return "\n".join(lines)
