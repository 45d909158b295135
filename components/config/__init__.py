"""Typed parameters: one pydantic model per params file (a module each), composed into one root, one loader.

A profile (``params/profiles/NAME.yaml``) holds per-section overrides merged over the stage files.
"""

from __future__ import annotations

from components.config.base import Modality, PrimaryMetric, Strict, TaskKind
from components.config.data import DataParams, FederationSpec, SplitSpec, TaskSpec
from components.config.decompose import (DecomposeParams, ImageStudentParams, StudentParams, TextStudentParams)
from components.config.evaluate import EvaluateParams
from components.config.experts import (ExpertMethodName, ExpertsParams, LoraParams, ProbeParams, PromptParams,
                                       WeightMethodName)
from components.config.federated import ClientParams, FederatedParams, InjectionParams
from components.config.foundation import FoundationParams, ImageFoundationParams, TextFoundationParams
from components.config.fusion import FusionParams, MergeMethodName
from components.config.load import expand_env, load_params, profile_names
from components.config.params import SECTIONS, Params
from components.config.pipeline import PipelineParams
from components.config.registry import RegistryParams
from components.config.routing import RouterName, RoutingParams
from components.config.training import ModalityTrainers, TrainerParams

__all__ = [
    "SECTIONS", "ClientParams", "DataParams", "FederatedParams", "InjectionParams", "DecomposeParams", "EvaluateParams", "ExpertMethodName", "ExpertsParams",
    "FederationSpec", "FoundationParams", "FusionParams", "ImageFoundationParams", "ImageStudentParams", "LoraParams",
    "MergeMethodName", "Modality", "ModalityTrainers", "Params", "PipelineParams", "PrimaryMetric", "ProbeParams",
    "PromptParams", "RegistryParams", "RouterName", "RoutingParams", "SplitSpec", "Strict", "StudentParams", "TaskKind", "TaskSpec",
    "TextFoundationParams", "TextStudentParams", "TrainerParams", "WeightMethodName", "expand_env", "load_params",
    "profile_names",
]
