"""Training objectives and samplers for the latent DiT, selected by name."""
from __future__ import annotations

from .ddpm import DDPM
from .flow import RectifiedFlow
from .guidance import guided_prediction

OBJECTIVES = {"flow": RectifiedFlow, "ddpm": DDPM}


def create_objective(name: str, **kwargs) -> RectifiedFlow | DDPM:
    """Build an objective by name ("flow" or "ddpm"); kwargs go to its constructor."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


__all__ = ["DDPM", "OBJECTIVES", "RectifiedFlow", "create_objective", "guided_prediction"]
