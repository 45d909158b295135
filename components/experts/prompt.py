"""Soft prompts (prompt tuning; Lester et al., EMNLP 2021) on the frozen text encoder, through PEFT.

N trainable virtual-token embeddings are prepended to the word embeddings of every input; the encoder stays
frozen. ``TextEncoder`` mean-pools over the virtual tokens too (their attention-mask entries are 1), so the
prompt steers the sentence embedding directly as well as through attention.

Soft prompts need a transformer's token sequence: the image foundation here is a CNN, which has none, so
the method is text-only (a ViT foundation would take visual prompt tokens before its patch tokens).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model, get_peft_model_state_dict
from peft import set_peft_model_state_dict
from torch import nn

from components.bundle.format import WRAPPERS, Wrapper
from components.config import PromptParams
from components.core.errors import ArtifactError, ParamsError

_INIT = {"text": PromptTuningInit.TEXT, "sample_vocab": PromptTuningInit.SAMPLE_VOCAB,
         "random": PromptTuningInit.RANDOM}


def check_prompt_fits(encoder: nn.Module, num_virtual_tokens: int, max_length: int) -> None:
    """Virtual tokens take position embeddings too: prompt + input must fit the model's positions."""
    limit = getattr(getattr(encoder.model, "config", None), "max_position_embeddings", None)
    if limit is not None and num_virtual_tokens + max_length > limit:
        raise ParamsError(
            f"experts.prompt.num_virtual_tokens: {num_virtual_tokens} virtual tokens + "
            f"{max_length} input tokens (foundation.text.max_length) = {num_virtual_tokens + max_length} "
            f"exceed the text encoder's {limit} positions"
        )


def _config(num_virtual_tokens: int, init: str, init_text: str = "", tokenizer_folder: Path | None = None,
            inference: bool = False) -> PromptTuningConfig:
    kwargs = {}
    if init == "text":
        if not init_text.strip():
            raise ParamsError("experts.prompt.init is 'text' but the task has no description "
                              "(data.yaml 'description') and 'prompt.init_text' is empty")
        # PEFT tokenizes the init text itself; the tokenizer is the foundation's own local folder (offline).
        kwargs = {"prompt_tuning_init_text": init_text, "tokenizer_name_or_path": str(tokenizer_folder),
                  "tokenizer_kwargs": {"local_files_only": True}}
    return PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=num_virtual_tokens,
                              prompt_tuning_init=_INIT[init] if not inference else PromptTuningInit.RANDOM,
                              inference_mode=inference, **kwargs)


def _wrap(model: nn.Module, config: PromptTuningConfig) -> nn.Module:
    with warnings.catch_warnings():  # PEFT calls a transformers helper that now warns of its own rename
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def attach_prompt(encoder: nn.Module, pp: PromptParams, *, description: str, tokenizer_folder: Path | None,
                  max_length: int) -> nn.Module:
    """A copy of the frozen text encoder with a trainable soft prompt (the encoder itself is left untouched)."""
    if not hasattr(encoder, "model") or not hasattr(encoder.model, "get_input_embeddings"):
        raise ParamsError("experts.method 'prompt' (soft prompts) needs a transformer text encoder; "
                          "the image foundation is a CNN, which has no token sequence: set 'image_method' "
                          "(lora, llora or full) for image tasks")
    check_prompt_fits(encoder, pp.num_virtual_tokens, max_length)
    model = copy.deepcopy(encoder)
    model.model = _wrap(model.model, _config(pp.num_virtual_tokens, pp.init, pp.init_text or description,
                                             tokenizer_folder))
    return model


def prompt_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained prompt: one (N, hidden) tensor, ``prompt_embeddings``."""
    return get_peft_model_state_dict(model.model)


def load_prompt(encoder: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """The frozen encoder with a stored prompt attached (inference mode: nothing trainable)."""
    if set(tensors) != {"prompt_embeddings"} or tensors["prompt_embeddings"].ndim != 2:
        raise ArtifactError(f"{where}: expected one 2-D tensor 'prompt_embeddings'; found {sorted(tensors)}")
    n, dim = tensors["prompt_embeddings"].shape
    if dim != encoder.out_dim:
        raise ArtifactError(f"{where}: prompt embeddings have width {dim}; the text encoder's is {encoder.out_dim}")
    model = copy.deepcopy(encoder)
    model.model = _wrap(model.model, _config(n, "random", inference=True))
    set_peft_model_state_dict(model.model, tensors)
    return model.requires_grad_(False)


WRAPPERS.add("prompt", Wrapper("prompt", lambda encoder, tensors, config, where: load_prompt(encoder, tensors, where)))  # a deployed soft-prompt expert carries its prompt
