"""Comet experiment tracking (GPT-NeoX ``use_comet`` and the ``comet_*`` keys).

comet_ml is not a dependency of this project: ``use_comet`` without it stops the run with one line. The experiment
is started as GPT-NeoX starts it (``comet_ml.start`` with console capture off, the resolved config logged as
parameters, then name, tags and ``comet_others``); Comet's own configuration decides online or offline
(``COMET_START_ONLINE=false`` or ``COMET_START_MODE=offline`` for an offline archive).
"""

from __future__ import annotations

from typing import Any, Mapping

from megatron.errors import UserInputError


class CometSetupError(UserInputError, RuntimeError):
    """use_comet is set but Comet cannot be started."""


def start_comet(cfg: Mapping[str, Any], run_config: Mapping[str, Any] | None) -> Any:
    """Start a Comet experiment; ``cfg`` holds workspace, project, name, tags and others."""
    try:
        import comet_ml
    except ImportError:
        raise CometSetupError("use_comet is set but comet_ml is not installed: pip install comet_ml, or set "
                              "use_comet false") from None
    experiment = comet_ml.start(workspace=cfg.get("workspace"), project=cfg.get("project"),
                                experiment_config=comet_ml.ExperimentConfig(auto_output_logging=False))
    experiment.log_parameters(_flatten(run_config or {}))
    if cfg.get("name"):
        experiment.set_name(cfg["name"])
    if cfg.get("tags"):
        experiment.add_tags(list(cfg["tags"]))
    if cfg.get("others"):
        experiment.log_others(dict(cfg["others"]))
    return experiment


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"num_layers": 2}}`` -> ``{"model.num_layers": 2}`` (Comet shows flat parameters)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
