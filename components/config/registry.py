"""params/registry.yaml: registered model names and the champion/challenger gate."""

from __future__ import annotations

from pydantic import Field

from components.config.base import Strict


class RegistryParams(Strict):
    prefix: str = Field("medexperts", description="Registered model names start with this.")
    margin: float = Field(0.0, ge=0, description="Challenger must beat champion's val metric by this.")
    floor: float = Field(0.0, ge=0, le=1, description="First model becomes champion only above this.")
    floors: dict[str, float] = Field(default_factory=dict, description="Per registered model floor (overrides floor).")

    def floor_for(self, name: str) -> float:
        return self.floors.get(name, self.floor)
