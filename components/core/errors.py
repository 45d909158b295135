"""One exception type per kind of failure; the CLI turns each into one line and a non-zero exit."""

from __future__ import annotations


class MedExpertsError(Exception):
    """Base class of every error a user can cause and fix."""


class ParamsError(MedExpertsError):
    """A params file is missing, malformed, or has a bad key or value."""


class DataError(MedExpertsError):
    """A dataset is missing, malformed, or inconsistent with its task spec."""


class ArtifactError(MedExpertsError):
    """An artifact (checkpoint, expert, manifest) is missing, corrupt, or incompatible."""


class RegistryError(MedExpertsError):
    """A registered model, version or alias does not exist or cannot be promoted."""


class TrackingError(MedExpertsError):
    """The tracking server or store cannot be reached or refuses a run, a param or a metric."""
