"""The exception types for input a user must fix: a config key, a file, or a value."""

from __future__ import annotations

from typing import Any


class AfptError(ValueError):
    """Bad input, reported in one line that names the key, file or value and what was expected."""


class DataError(AfptError):
    """A corpus, file or data option that cannot be used, with the key or file that caused it."""


def build_target(node: Any, key: str, **kwargs: Any) -> Any:
    """Instantiate the ``_target_`` config node at ``key`` (``kwargs`` as Hydra's ``instantiate`` takes them); a
    failure (an unknown target, a bad argument) becomes one AfptError naming the key and the target, and an
    AfptError the object raises itself passes through."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, AfptError):
            raise err.__cause__ from None
        raise AfptError(f"{key}: cannot build {node.get('_target_')!r}: {err.__cause__ or err}") from err


def check_number(
    key: str,
    value: Any,
    least: float | None = None,
    above: float | None = None,
    most: float | None = None,
    below: float | None = None,
    integer: bool = False,
) -> None:
    """``key`` (a config key) is a number (an integer if asked) within the bounds given, or one ``AfptError``."""
    kinds = (int,) if integer else (int, float)
    bounds = [
        f">= {least}" if least is not None else "",
        f"> {above}" if above is not None else "",
        f"<= {most}" if most is not None else "",
        f"< {below}" if below is not None else "",
    ]
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and (least is None or value >= least) and (above is None or value > above)
    ok = ok and (most is None or value <= most) and (below is None or value < below)
    if not ok:
        wanted = "an integer" if integer else "a number"
        raise AfptError(f"{key} must be {wanted} {' and '.join(b for b in bounds if b)}, got {value!r}")
