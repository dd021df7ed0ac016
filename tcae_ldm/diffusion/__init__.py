"""Training objectives and samplers for the latent DiT, selected by name."""
from __future__ import annotations

from tcae_ldm.utils.kwargs import parameter_names

from .ddpm import DDPM
from .flow import RectifiedFlow
from .guidance import guided_prediction

OBJECTIVES = {"flow": RectifiedFlow, "ddpm": DDPM}


def create_objective(name: str, **kwargs) -> RectifiedFlow | DDPM:
    """Build an objective by name ("flow" or "ddpm"); kwargs go to its constructor."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    unknown = sorted(set(kwargs) - parameter_names(OBJECTIVES[name]))
    if unknown:
        raise ValueError(f"objective {name!r} does not take {unknown} (objective_args); it takes "
                         f"{sorted(parameter_names(OBJECTIVES[name]))}")
    return OBJECTIVES[name](**kwargs)


__all__ = ["DDPM", "OBJECTIVES", "RectifiedFlow", "create_objective", "guided_prediction"]
