"""Base class of every config section: frozen, and unknown fields are errors."""
from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
