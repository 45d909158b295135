"""FedKIM's server side (Wang et al., EMNLP 2024, arXiv 2408.10276): inject the aggregated client encoders into the
frozen text foundation through M3OE, train only what was added on the server's own small split, evaluate.

The injected model (``InjectedFoundation``), per sample of task t:
- the text part: the sample's text for a text task; for an image task its description (``"<modality
  description>: <task description>"``), since the foundation is a text model;
- extra tokens, prepended to the word embeddings (HF ``inputs_embeds``): the frozen aggregated client image
  encoder's feature of the pixels (image tasks), or the frozen aggregated client text encoder's pooled feature of
  the text (text tasks), each through a trainable projection to ``extra_tokens`` foundation-width tokens; the
  attention mask is extended by ones for them (zeros where no client encoder of that modality was given); the text
  keeps the position ids it was pre-trained with (0..L-1: [CLS] at 0), the extra tokens take the positions after
  ``max_length`` (``extra_positions="after_text"``; models saved before this option prepended them at 0..K-1 and
  shifted the text by K, ``"first"``, and still load that way);
- M3OE: every targeted Linear of the frozen foundation (attention and feed-forward) carries E fresh rank-r LoRA
  experts (``attach_molora``); the gate (``M3OEGate``: the modality description's token embeddings attend to the
  task description's, both embedded by the foundation's own word embeddings) gives one weight vector per task,
  hence per sample, shared by every mixture layer (``routing_context``);
- mean pooling over the real tokens, extra tokens included (as ``TextEncoder``), then the task's head; with
  ``client_heads`` (the aggregated client model's heads, an extension of the paper's method) the head reads the
  pooled feature and the client head's log-probabilities of the sample (zeros for a task without one, e.g. a
  held-out task): the clients' heads were trained on every client's rows, the server's on its small split alone.

Trainable on the server: the experts, the gate, the projections and the heads; the foundation, the client
encoders and the client heads stay frozen (and in eval mode). ``no_injection`` is the same pipeline with E = 0 and
no client encoders: the frozen foundation and trained heads only. ``fit_head_on`` adds a held-out task (no client
trained on it) and fits only its head on top of the injected model. ``save_injected`` / ``load_injected`` write and
rebuild it (safetensors + manifest with the config; the foundation is checked by its hash).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from components.core import stop
from components.config import ProbeParams, TrainerParams
from components.core.artifacts import read_manifest, save_tensors, write_manifest
from components.core.errors import ArtifactError, DataError, ParamsError
from components.data.datasets import TaskData
from components.decompose.backbones import TextBackbone
from components.decompose.loss import distill_loss, task_targets
from components.federated.clients import MODALITIES, ClientModel, TaskSpec, check_task_spec, frozen_encoders
from components.metrics.classification import compute_metrics
from components.moe.layers import attach_molora, molora_layers, routing_context
from components.moe.m3oe import M3OEGate, describe
from components.nn.encoders import ImageEncoder, TextEncoder, image_tensor, masked_mean, tokenize, trim_padding
from components.nn.foundation import Foundation
from components.nn.ngram import NgramTextEncoder
from components.nn.resnet import ImageBackbone
from components.training.balance import ClassWeight, loss_weight
from components.training.data import TensorDictDataset, labels_tensor, loader
from components.training.module import task_loss
from components.training.probe import fit_probe
from components.training.schedule import one_cycle
from components.training.trainer import on_gpu, resolve_precision

KIND = "fedkim"  # manifest kind of a saved injected model
TRAINABLE_FILE = "injected.safetensors"
ENCODERS_FILE = "client_encoders.safetensors"
HEADS_PREFIX = "heads."  # the client heads' keys in ENCODERS_FILE (the encoders' are "<modality>.")

# Where the extra tokens sit among the position ids: after the text (its pre-trained positions kept), or first.
EXTRA_POSITIONS = ("after_text", "first")
# Every Linear of a BertLayer: attention q/k/v and output, feed-forward in and out (suffix names, as PEFT).
DEFAULT_TARGETS: tuple[str, ...] = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                                    "output.dense")
DEFAULT_MODALITY_DESCRIPTIONS = {"image": "medical image", "text": "clinical text"}
PRESERVE_KEY = "preserve_logits"  # a training batch's reference logits (knowledge preservation; train_injected)

# Client encoders the server can rebuild from their ``config`` (what a saved injected model records).
_ENCODER_TYPES: dict[str, type[nn.Module]] = {"ImageEncoder": ImageEncoder, "ImageBackbone": ImageBackbone,
                                              "TextBackbone": TextBackbone, "NgramTextEncoder": NgramTextEncoder}


def _encoder_spec(modality: str, encoder: nn.Module) -> dict[str, Any]:
    name = type(encoder).__name__
    if name not in _ENCODER_TYPES or not isinstance(getattr(encoder, "config", None), dict):
        raise ArtifactError(f"client {modality} encoder {name} cannot be saved: the server rebuilds only "
                            f"{sorted(_ENCODER_TYPES)} from their config")
    return {"type": name, "config": copy.deepcopy(encoder.config)}


def _encoder_from_spec(modality: str, spec: Any) -> nn.Module:
    if not isinstance(spec, dict) or spec.get("type") not in _ENCODER_TYPES or not isinstance(spec.get("config"),
                                                                                              dict):
        raise ArtifactError(f"saved client {modality} encoder spec {spec!r} is not one of {sorted(_ENCODER_TYPES)} "
                            "with a config")
    try:
        return _ENCODER_TYPES[spec["type"]](**spec["config"])
    except (TypeError, ValueError, ParamsError) as exc:
        raise ArtifactError(f"saved client {modality} encoder cannot be rebuilt from its config ({exc})") from None


def client_log_probs(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """A client head's prediction as the injected heads read it: log-softmax (single-label), log-sigmoid per label
    (multilabel)."""
    return nn.functional.logsigmoid(logits) if kind == "multilabel" else nn.functional.log_softmax(logits, -1)


def _checked_client_heads(heads: Mapping[str, nn.Module], specs: Mapping[str, TaskSpec],
                          encoders: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The aggregated client heads to read (task -> Linear over its modality's client encoder), checked."""
    for task, head in heads.items():
        if task not in specs:
            raise ParamsError(f"FedKIM: a client head for task {task!r}, which is not a task of the injected model "
                              f"{sorted(specs)}")
        modality = specs[task].modality
        if modality not in encoders:
            raise ParamsError(f"FedKIM: task {task!r} has a client head but no client {modality} encoder to feed it")
        shape = (getattr(head, "in_features", None), getattr(head, "out_features", None))
        if not isinstance(head, nn.Linear) or shape != (encoders[modality].out_dim, specs[task].num_labels):
            raise ParamsError(f"FedKIM: the client head of task {task!r} must be a Linear "
                              f"{encoders[modality].out_dim} -> {specs[task].num_labels} (its client {modality} "
                              f"encoder's width -> the task's labels); got {type(head).__name__} {shape}")
    return dict(heads)


class InjectedFoundation(nn.Module):
    """The frozen text foundation + M3OE experts + injected client encoders + per-task heads (see the module doc).

    Build it with ``build_injected`` (or ``no_injection``); ``forward`` gives the heads' input features (the pooled
    feature, with client heads their log-probabilities too), ``task_logits`` the logits of one task, ``encode``
    turns task splits into its inputs.
    """

    def __init__(self, encoder: TextEncoder, tokenizer: Any, tasks: Mapping[str, Any],
                 client_encoders: Mapping[str, nn.Module], *, num_experts: int, rank: int, alpha: float | None,
                 targets: Sequence[str], extra_tokens: int, gate_heads: int, max_length: int,
                 description_length: int, seed: int, foundation_sha256: str,
                 extra_positions: str = "after_text", client_heads: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        if not tasks:
            raise ParamsError("FedKIM: no tasks given; the injected model needs at least one task head")
        specs = {name: check_task_spec(name, spec) for name, spec in tasks.items()}
        unknown = sorted(set(client_encoders) - set(MODALITIES))
        if unknown:
            raise ParamsError(f"FedKIM: client encoders are keyed by modality {list(MODALITIES)}; got {unknown}")
        if num_experts < 0 or (num_experts and (rank < 1 or not targets)):
            raise ParamsError(f"FedKIM: num_experts={num_experts} must be >= 0 (0: no experts); with experts rank "
                              f"must be >= 1 (got {rank}) and targets non-empty (got {list(targets)})")
        if extra_positions not in EXTRA_POSITIONS:
            raise ParamsError(f"FedKIM: extra_positions={extra_positions!r}; one of {list(EXTRA_POSITIONS)}")
        if extra_tokens < 1 or gate_heads < 1 or description_length < 2:
            raise ParamsError(f"FedKIM: extra_tokens={extra_tokens} and gate_heads={gate_heads} must be >= 1, "
                              f"description_length={description_length} >= 2")
        self.encoder = encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.dim = int(encoder.out_dim)
        self.num_experts, self.rank, self.alpha, self.targets = num_experts, rank, alpha, list(targets)
        self.extra_tokens, self.gate_heads, self.seed = extra_tokens, gate_heads, seed
        self.extra_positions = extra_positions
        self.description_length, self.foundation_sha256 = description_length, foundation_sha256
        positions = int(encoder.model.config.max_position_embeddings)
        slots = extra_tokens if client_encoders else 0
        if max_length + slots > positions:
            raise ParamsError(f"FedKIM: max_length {max_length} + {slots} extra token(s) exceeds the foundation's "
                              f"{positions} positions; lower max_length")
        self.max_length = max_length
        self.client_encoders = nn.ModuleDict({m: e.eval().requires_grad_(False) for m, e in client_encoders.items()})
        for modality, enc in self.client_encoders.items():
            if not isinstance(getattr(enc, "out_dim", None), int):
                raise ParamsError(f"FedKIM: client {modality} encoder {type(enc).__name__} has no integer out_dim")
            limit = getattr(enc, "max_positions", None)
            if modality == "text" and limit is not None and limit < max_length:
                raise ParamsError(f"FedKIM: the client text encoder keeps {limit} positions, fewer than the "
                                  f"foundation's max_length {max_length}; build it with max_positions >= {max_length}")
        self.project = nn.ModuleDict({m: nn.Linear(e.out_dim, extra_tokens * self.dim)
                                      for m, e in self.client_encoders.items()})
        self.client_heads = nn.ModuleDict({t: h.eval().requires_grad_(False) for t, h in
                                           _checked_client_heads(client_heads or {}, specs,
                                                                 self.client_encoders).items()})
        # the width of the client log-probabilities appended to the pooled feature (0: no client heads)
        self.client_width = max((specs[t].num_labels for t in self.client_heads), default=0)
        self.feature_dim = self.dim + self.client_width
        if num_experts:
            attach_molora(encoder.model, self.targets, num_experts, rank, alpha, seed=seed)
            self.gate: M3OEGate | None = M3OEGate(self.dim, num_experts, gate_heads)
        else:
            self.gate = None
        self.tasks: dict[str, TaskSpec] = {}
        self.heads = nn.ModuleDict()
        for name, spec in specs.items():
            self.tasks[name] = spec
            self.heads[name] = nn.Linear(self.feature_dim, spec.num_labels)
        self._describe()
        self.train(self.training)

    # --- tasks and their descriptions ---

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise DataError(f"unknown task {task!r}; the injected model's tasks are {self.task_names} "
                            "(a held-out task is added by fit_head_on)")
        return self.task_names.index(task)

    @torch.no_grad()
    def _describe(self) -> None:
        """Embed every task's modality and task description with the foundation's word embeddings (frozen, so
        once); buffers, not saved: they are rebuilt from the descriptions."""
        embedding = self.encoder.model.embeddings.word_embeddings
        specs = list(self.tasks.values())
        mod, mod_mask = describe([s.modality_description for s in specs], self.tokenizer, embedding,
                                 self.description_length)
        task, task_mask = describe([s.description for s in specs], self.tokenizer, embedding, self.description_length)
        self.register_buffer("modality_embeddings", mod.detach(), persistent=False)
        self.register_buffer("modality_mask", mod_mask, persistent=False)
        self.register_buffer("task_embeddings", task.detach(), persistent=False)
        self.register_buffer("task_mask", task_mask, persistent=False)
        device = embedding.weight.device
        self.register_buffer("task_is_image", torch.tensor([s.modality == "image" for s in specs], device=device),
                             persistent=False)

    def add_task(self, name: str, spec: Any) -> None:
        """A new task (e.g. held out from the clients): its head (fresh) and its descriptions for the gate."""
        if name in self.tasks:
            raise ParamsError(f"task {name!r} is already a task of the injected model")
        spec = check_task_spec(name, spec)
        self.tasks[name] = spec
        self.heads[name] = nn.Linear(self.feature_dim, spec.num_labels).to(self.modality_embeddings.device)
        self._describe()

    def description_text(self, task: str) -> str:
        """The text part of an image sample: its modality and task descriptions."""
        spec = self.tasks[task]
        return f"{spec.modality_description}: {spec.description}"

    # --- the forward ---

    def train(self, mode: bool = True) -> "InjectedFoundation":
        super().train(mode)
        self.encoder.eval()  # frozen foundation and client encoders: no dropout noise, whatever the mode
        self.client_encoders.eval()
        self.client_heads.eval()
        return self

    def routing_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """The M3OE gate's expert weights (N, E): one vector per task from its descriptions, indexed per sample."""
        if self.gate is None:
            raise ParamsError("this injected model has no experts (num_experts=0), hence no routing")
        per_task = self.gate(self.modality_embeddings, self.task_embeddings, self.modality_mask, self.task_mask)
        return per_task[task_ids]

    def _check_task_ids(self, task_ids: torch.Tensor) -> None:
        if task_ids.ndim != 1 or task_ids.dtype not in (torch.int64, torch.int32):
            raise DataError(f"task_ids must be an integer tensor (N,), got {task_ids.dtype} {tuple(task_ids.shape)}")
        if len(task_ids) and (int(task_ids.min()) < 0 or int(task_ids.max()) >= len(self.tasks)):
            raise DataError(f"task ids range [{int(task_ids.min())}, {int(task_ids.max())}]; the injected model has "
                            f"{len(self.tasks)} tasks {self.task_names}")

    def _extra(self, task_ids: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               pixels: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected client features as (N, K, d) extra tokens and their mask (N, K), and the client heads'
        log-probabilities (N, client_width): each sample's own task's, zero-padded; zeros where its task has no
        client head."""
        n, k = len(task_ids), self.extra_tokens
        tokens = like.new_zeros(n, k, self.dim)
        mask = attention_mask.new_zeros(n, k)
        scores = like.new_zeros(n, self.client_width)
        is_image = self.task_is_image[task_ids]
        for modality, rows in (("image", is_image.nonzero().flatten()), ("text", (~is_image).nonzero().flatten())):
            if not len(rows) or modality not in self.client_encoders:
                continue
            with torch.no_grad():  # frozen client encoder: only the projection learns
                if modality == "image":
                    if pixels is None:
                        raise DataError("image-task samples need pixels; encode the split with model.encode(...)")
                    feats = self.client_encoders["image"](pixels=pixels[rows])
                else:
                    feats = self.client_encoders["text"](input_ids=input_ids[rows],
                                                         attention_mask=attention_mask[rows])
                for task in task_ids[rows].unique().tolist():
                    name = self.task_names[task]
                    if name in self.client_heads:
                        mine = task_ids[rows] == task
                        head = self.client_heads[name]
                        # the head's own precision, not bf16 autocast: training and evaluation read the same values
                        with torch.autocast(feats.device.type, enabled=False):
                            logp = client_log_probs(self.tasks[name].kind, head(feats[mine].to(head.weight.dtype)))
                        padded = nn.functional.pad(logp.to(scores.dtype), (0, self.client_width - logp.shape[1]))
                        scores = scores.index_copy(0, rows[mine], padded)
            projected = self.project[modality](feats.to(like.dtype)).reshape(len(rows), k, self.dim)
            tokens = tokens.index_copy(0, rows, projected.to(tokens.dtype))
            mask[rows] = 1
        return tokens, mask, scores

    def forward(self, task_ids: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' input features (N, feature_dim) of a (mixed-task) batch: the pooled foundation feature (d),
        then, with client heads, the sample's client log-probabilities (client_width). ``task_ids`` (N,) index
        ``task_names``; ``input_ids`` / ``attention_mask`` (N, L) the text part; ``pixels`` (N, C, H, W) for image
        samples (ignored elsewhere)."""
        self._check_task_ids(task_ids)
        input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        words = self.encoder.model.embeddings.word_embeddings(input_ids)
        mask, positions, scores = attention_mask, None, None
        if len(self.client_encoders):
            tokens, extra_mask, scores = self._extra(task_ids, input_ids, attention_mask, pixels, words)
            words = torch.cat([tokens, words], 1)
            mask = torch.cat([extra_mask, attention_mask], 1)
            if self.extra_positions == "after_text":  # the text where it was pre-trained, the extra tokens after it
                k, length = self.extra_tokens, input_ids.shape[1]
                if length > self.max_length:
                    raise DataError(f"{length} text tokens exceed the injected model's max_length "
                                    f"{self.max_length} (the extra tokens' positions follow it); tokenize to "
                                    f"max_length={self.max_length}")
                ids = torch.cat([torch.arange(self.max_length, self.max_length + k), torch.arange(length)])
                positions = ids.to(input_ids.device).unsqueeze(0).expand(len(input_ids), -1)
        if words.shape[1] > self.encoder.model.config.max_position_embeddings:
            raise DataError(f"{words.shape[1]} tokens (text + extra) exceed the foundation's "
                            f"{self.encoder.model.config.max_position_embeddings} positions; tokenize to "
                            f"max_length={self.max_length}")
        routing = routing_context(molora_layers(self.encoder.model), weights=self.routing_weights(task_ids)) \
            if self.gate is not None else contextlib.nullcontext()
        with routing:
            hidden = self.encoder.model(inputs_embeds=words, attention_mask=mask,
                                        position_ids=positions).last_hidden_state
        pooled = masked_mean(hidden, mask)
        if not self.client_width:
            return pooled
        return torch.cat([pooled, scores.to(pooled.dtype)], 1)

    def task_logits(self, task: str, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits of one task on a batch of that task only (``task_ids`` are filled in)."""
        index = self.task_index(task)
        n = len(inputs["input_ids"])
        ids = torch.full((n,), index, dtype=torch.long, device=inputs["input_ids"].device)
        return self.heads[task](self(ids, **inputs))

    # --- data ---

    def encode(self, data: Mapping[str, TaskData]) -> TensorDictDataset:
        """Task splits (name -> TaskData) as one mixed dataset: input_ids / attention_mask (text, or the task's
        description for image samples), pixels (zeros for text samples) when an image task is present, labels
        (class ids (N,); (N, max L) floats, single-label rows one-hot, when a task is multilabel), task_ids."""
        if not data:
            raise DataError("FedKIM: no task data given")
        texts: list[str] = []
        images: list[torch.Tensor] = []
        ids, labels, image_rows = [], [], []
        in_channels = getattr(self.client_encoders["image"], "config", {}).get("in_channels", 3) \
            if "image" in self.client_encoders else 3
        for task, split in data.items():
            index = self.task_index(task)
            spec = self.tasks[task]
            if (split.modality, split.kind, split.num_labels) != (spec.modality, spec.kind, spec.num_labels):
                raise DataError(f"task {task!r}: the split is {split.modality}/{split.kind} with {split.num_labels} "
                                f"labels; the injected model's head expects {spec.modality}/{spec.kind} with "
                                f"{spec.num_labels}")
            if len(split) == 0:
                raise DataError(f"task {task!r}: the split has no rows")
            y = labels_tensor(split.labels, split.kind)
            if split.kind != "multilabel" and (y.ndim != 1 or int(y.min()) < 0 or int(y.max()) >= spec.num_labels):
                raise DataError(f"task {task!r}: labels must be class ids in [0, {spec.num_labels}), got shape "
                                f"{tuple(y.shape)}")
            if split.kind == "multilabel" and (y.ndim != 2 or y.shape[1] != spec.num_labels):
                raise DataError(f"task {task!r}: multilabel labels must be (N, {spec.num_labels}), got "
                                f"{tuple(y.shape)}")
            labels.append(y)
            ids.append(torch.full((len(split),), index, dtype=torch.long))
            if spec.modality == "text":
                texts.extend(split.inputs)
                image_rows.append(torch.zeros(len(split), dtype=torch.bool))
            else:
                texts.extend([self.description_text(task)] * len(split))
                images.append(image_tensor(np.asarray(split.inputs), in_channels)["pixels"])
                image_rows.append(torch.ones(len(split), dtype=torch.bool))
        inputs = tokenize(self.tokenizer, texts, self.max_length)
        if images:
            shapes = {tuple(x.shape[1:]) for x in images}
            if len(shapes) > 1:
                raise DataError(f"image tasks of one batch must share their image shape; got {sorted(shapes)}")
            pixels = torch.zeros(len(texts), *shapes.pop())
            pixels[torch.cat(image_rows)] = torch.cat(images)
            inputs["pixels"] = pixels
        if any(y.ndim == 2 for y in labels):
            width = max(self.tasks[t].num_labels for t in data)
            padded = []
            for y, task in zip(labels, data, strict=True):
                n_labels = self.tasks[task].num_labels
                y = y.float() if y.ndim == 2 else nn.functional.one_hot(y, n_labels).float()
                padded.append(nn.functional.pad(y, (0, width - n_labels)))
            labels = padded
        return TensorDictDataset(inputs, torch.cat(labels), torch.cat(ids))

    # --- what trains, what is saved ---

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters (experts, gate, projections, heads), detached CPU copies."""
        params = dict(self.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in self.trainable_names()}

    def config(self) -> dict[str, Any]:
        """Everything ``load_injected`` needs, besides the foundation and the saved tensors."""
        return {
            "tasks": [{"name": n, **s._asdict()} for n, s in self.tasks.items()],  # a list: the order is the task ids
            "num_experts": self.num_experts, "rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
            "extra_tokens": self.extra_tokens, "extra_positions": self.extra_positions,
            "gate_heads": self.gate_heads, "max_length": self.max_length,
            "description_length": self.description_length, "seed": self.seed,
            "client_encoders": {m: _encoder_spec(m, e) for m, e in self.client_encoders.items()},
            "client_heads": list(self.client_heads),
            "foundation_sha256": self.foundation_sha256,
        }


def build_injected(
    foundation: Foundation,
    client_encoders: Mapping[str, nn.Module] | ClientModel | None,
    tasks: Mapping[str, Any],
    num_experts: int = 4,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    extra_tokens: int = 1,
    extra_positions: str = "after_text",
    client_heads: Mapping[str, nn.Module] | None = None,
    gate_heads: int = 1,
    max_length: int | None = None,
    description_length: int = 32,
    seed: int = 0,
) -> InjectedFoundation:
    """The injected model over a copy of ``foundation``'s text encoder (the caller's stays untouched).

    ``client_encoders``: modality -> aggregated client encoder (or the aggregated ``ClientModel`` itself), copied
    and frozen; None / {} injects none. ``tasks``: name -> ``TaskSpec`` (modality, description,
    modality_description, num_labels, kind). ``num_experts`` E rank-``rank`` experts per targeted Linear (0: none);
    ``alpha`` the LoRA scale numerator (None: scale 1). ``max_length`` defaults to the foundation's.
    ``extra_positions``: the extra tokens' position ids, after the text (default) or first (the text shifted).
    ``client_heads``: task -> the aggregated client model's head of that task (copied and frozen; e.g.
    ``client_model.heads``): its log-probabilities of a sample join the pooled feature its task's head reads, so the
    server's heads build on what the clients' heads learnt on all their rows; None / {}: none.
    Fresh weights (experts, gate, projections, heads) are drawn under ``seed``."""
    if foundation.modality != "text" or not isinstance(foundation.encoder, TextEncoder):
        raise ParamsError(f"FedKIM injects into a text foundation (a TextEncoder); got a {foundation.modality} one")
    if foundation.tokenizer is None:
        raise ParamsError("FedKIM: the text foundation has no tokenizer")
    if isinstance(client_encoders, ClientModel):
        encoders = frozen_encoders(client_encoders)
    else:
        encoders = {m: copy.deepcopy(e) for m, e in (client_encoders or {}).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return InjectedFoundation(
            copy.deepcopy(foundation.encoder), foundation.tokenizer, tasks, encoders, num_experts=num_experts,
            rank=rank, alpha=alpha, targets=targets, extra_tokens=extra_tokens, extra_positions=extra_positions,
            client_heads={t: copy.deepcopy(h) for t, h in (client_heads or {}).items()}, gate_heads=gate_heads,
            max_length=foundation.max_length if max_length is None else max_length,
            description_length=description_length, seed=seed, foundation_sha256=foundation.sha256)


def no_injection(foundation: Foundation, tasks: Mapping[str, Any], *, max_length: int | None = None,
                 seed: int = 0) -> InjectedFoundation:
    """The baseline: the frozen foundation and trainable heads only (no experts, no client encoders)."""
    return build_injected(foundation, None, tasks, num_experts=0, max_length=max_length, seed=seed)


# --- training and evaluation ---

def mixed_loss(model: InjectedFoundation, batch: Mapping[str, torch.Tensor],
               weights: Mapping[str, torch.Tensor | None] | None = None, preserve: float = 0.0) -> torch.Tensor:
    """Mean task loss of a mixed batch, each sample scored by its own task's head (``weights``: per task, the
    ``task_loss`` weight of its class balance; none: unweighted). With ``preserve`` > 0 and the batch's
    ``preserve_logits`` (the no-injection model's logits, zero-padded; see ``train_injected``), each text-task
    sample adds ``preserve`` · KL(no injection || injected) on its task's outputs."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "task_ids", PRESERVE_KEY)}
    task_ids, labels = batch["task_ids"], batch["labels"]
    feats = model(task_ids, **inputs)
    total = feats.new_zeros(())
    for index in task_ids.unique().tolist():
        name = model.task_names[index]
        rows = task_ids == index
        spec = model.tasks[name]
        logits = model.heads[name](feats[rows])
        weight = None if weights is None else weights.get(name)
        loss = task_loss(spec.kind, logits, task_targets(labels[rows], spec.kind, spec.num_labels), weight)
        if preserve and spec.modality == "text" and PRESERVE_KEY in batch:
            reference = batch[PRESERVE_KEY][rows, :spec.num_labels].float()  # fp32 even under bf16 autocast
            loss = loss + preserve * distill_loss(spec.kind, logits.float(), reference, temperature=1.0)
        total = total + loss * rows.sum()
    return total / len(task_ids)


@torch.no_grad()
def _reference_logits(reference: InjectedFoundation, train: Mapping[str, TaskData]) -> torch.Tensor:
    """The reference model's logits on every row of ``train``, in ``encode``'s row order, zero-padded to the
    widest task; image-task rows stay zero (no text knowledge to preserve there)."""
    width = max(reference.tasks[t].num_labels for t in train)
    parts = []
    for task, split in train.items():
        if reference.tasks[task].modality == "text":
            logits = injected_logits(reference, task, split)
            parts.append(nn.functional.pad(logits, (0, width - logits.shape[1])))
        else:
            parts.append(torch.zeros(len(split), width))
    return torch.cat(parts)


def _check_training(epochs: int, batch_size: int, lr: float, weight_decay: float, what: str) -> None:
    for name, value, ok in (("epochs", epochs, epochs >= 1), ("batch_size", batch_size, batch_size >= 1),
                            ("lr", lr, lr > 0), ("weight_decay", weight_decay, weight_decay >= 0)):
        if not ok:
            raise ParamsError(f"{what}: {name}={value} is out of range (epochs, batch_size >= 1; lr > 0; "
                              "weight_decay >= 0)")


def _cap(data: Mapping[str, TaskData], n: int | None, seed: int) -> dict[str, TaskData]:
    return {t: d.subset(n, seed) for t, d in data.items()}


def train_injected(
    model: InjectedFoundation,
    train: Mapping[str, TaskData],
    val: Mapping[str, TaskData] | None = None,
    trainer: TrainerParams | None = None,
    *,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    class_weight: ClassWeight = "balanced",
    monitor: str | None = None,
    preserve: float = 0.0,
    reference: InjectedFoundation | None = None,
) -> dict[str, float]:
    """Train the experts, the gate, the projections and the heads on the server's split (mixed-task batches,
    AdamW, each sample by its own head); the foundation and client encoders stay frozen.

    ``class_weight``: each task's loss weighs its classes by the server split's balance
    (``components.training.balance``). ``trainer`` (TrainerParams), when given, sets epochs, batch size, lr, weight
    decay, class weighting, patience, the per-task sample cap and the device (GPU when its accelerator resolves to
    one; bf16 autocast when its precision does). Returns
    ``train_loss`` (last epoch) and, with ``val``, ``val_<task>_<metric>``; ``on_epoch(epoch, metrics)`` is called
    after each epoch. With ``val`` and ``monitor`` (a metric, e.g. "macro_f1"), the trainable weights of the epoch
    with the best mean validation ``monitor`` over the tasks are restored at the end (``best_epoch`` in the returned
    metrics, which are that epoch's; epoch 0, the start, is a candidate: training is kept only where it beats the
    untrained model on validation), and training stops after ``trainer.early_stopping_patience`` epochs without
    improvement (0: never). Deterministic for a given ``seed`` on CPU; the global RNG is left as is.

    ``preserve`` > 0 with a ``reference`` model (the no-injection one, its heads fitted on the same rows) adds a
    knowledge-preservation term on the text tasks' rows (Learning without Forgetting, Li & Hoiem 2016):
    ``preserve`` · KL(reference || injected) on each row's task outputs. The server trains on a few hundred rows per
    task, which over-fit the foundation's text path (``bench/results/fedkim_variants*.json``: all trained variants
    but one lost Medical Abstracts against no injection); the term keeps what the frozen foundation already knew on text
    while the experts learn what the client encoders add. Image rows get none: there the reference sees only the
    task's description, so it holds no knowledge to keep."""
    autocast = False
    patience = 0
    if trainer is not None:
        epochs, batch_size, lr, weight_decay = trainer.max_epochs, trainer.batch_size, trainer.lr, trainer.weight_decay
        class_weight = trainer.class_weight
        patience = trainer.early_stopping_patience
        train = _cap(train, trainer.max_train_samples, seed)
        device = torch.device("cuda") if on_gpu(trainer) else torch.device("cpu")
        autocast = resolve_precision(trainer) == "bf16-mixed" and device.type == "cuda"
    _check_training(epochs, batch_size, lr, weight_decay, "FedKIM server training")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ParamsError("FedKIM server training: the injected model has no trainable parameter")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if preserve < 0:
        raise ParamsError(f"FedKIM server training: preserve={preserve} must be >= 0")
    if preserve and reference is None:
        raise ParamsError("FedKIM server training: preserve > 0 needs the reference (no-injection) model")
    data = model.encode(train)
    if preserve:
        data.inputs[PRESERVE_KEY] = _reference_logits(reference, train)
    data = data.to(device)
    weights = {t: loss_weight(d.kind, labels_tensor(d.labels, d.kind), model.tasks[t].num_labels, class_weight)
               for t, d in train.items()}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    batches = loader(data, batch_size, shuffle=True, seed=seed,
                     group_by_length=trainer is not None and trainer.group_by_length)
    schedule = (one_cycle(opt, epochs * len(batches)) if trainer is not None and trainer.lr_schedule == "one_cycle"
                else None)
    metrics: dict[str, float] = {}
    best: tuple[float, int, dict[str, torch.Tensor], dict[str, float]] | None = None
    if val is not None and monitor is not None:  # the start is a candidate too: training must beat it on validation
        scores = evaluate_injected(model, val)
        start = {f"val_{t}_{k}": v for t, m in scores.items() for k, v in m.items()}
        best = (float(np.nanmean([m[monitor] for m in scores.values()])), 0, model.trainable_state(), start)
    mode = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for epoch in range(1, epochs + 1):
                total, seen = torch.zeros((), device=device), 0
                for batch in batches:
                    stop.check("a FedKIM server batch")
                    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                        loss = mixed_loss(model, batch, weights, preserve)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if schedule is not None:
                        schedule.step()
                    total += loss.detach() * len(batch["task_ids"])
                    seen += len(batch["task_ids"])
                metrics = {"train_loss": float(total) / seen}
                if not math.isfinite(metrics["train_loss"]):
                    raise DataError(f"FedKIM server training diverged at epoch {epoch} (loss "
                                    f"{metrics['train_loss']}); lower lr")
                if val is not None:
                    scores = evaluate_injected(model, val)
                    metrics |= {f"val_{t}_{k}": v for t, m in scores.items() for k, v in m.items()}
                    if monitor is not None:
                        value = float(np.nanmean([m[monitor] for m in scores.values()]))
                        if best is None or value > best[0]:
                            best = (value, epoch, model.trainable_state(), dict(metrics))
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
                if best is not None and patience and epoch - best[1] >= patience:
                    break
    finally:
        for p in params:
            p.grad = None
        model.train(mode)
    if best is not None:
        _, epoch, state, metrics = best
        with torch.no_grad():
            named = dict(model.named_parameters())
            for name, value in state.items():
                named[name].copy_(value.to(named[name].device, named[name].dtype))
        metrics = {**metrics, "best_epoch": float(epoch)}
    return metrics


@torch.no_grad()
def injected_logits(model: InjectedFoundation, task: str, split: TaskData, batch_size: int = 64) -> torch.Tensor:
    """Logits (N, labels) of one task's split, in eval mode (the model's mode is restored), on CPU."""
    feats, _ = task_features(model, task, split, batch_size)
    return model.heads[task](feats).float().cpu()


def evaluate_injected(model: InjectedFoundation, split: Mapping[str, TaskData],
                      batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per-task ``compute_metrics`` (accuracy, macro_f1, auroc, mcc) of the injected model on task splits."""
    if not split:
        raise DataError("FedKIM evaluation: no task data given")
    out = {}
    for task, data in split.items():
        logits = injected_logits(model, task, data, batch_size)
        out[task] = compute_metrics(data.kind, logits, labels_tensor(data.labels, data.kind), data.num_labels)
    return out


@torch.no_grad()
def task_features(model: InjectedFoundation, task: str, split: TaskData,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads' input features (N, feature_dim) of one task's split in eval mode (the model's mode is restored), on
    the model's device, and its targets (class ids, or (N, L) floats for a multilabel task)."""
    data = model.encode({task: split})
    device = next(model.parameters()).device
    mode = model.training
    model.eval()
    try:
        feats = torch.cat([model(data.task_ids[i:i + batch_size].to(device),
                                 **{k: v[i:i + batch_size].to(device) for k, v in data.inputs.items()})
                           for i in range(0, len(data), batch_size)])
    finally:
        model.train(mode)
    spec = model.tasks[task]
    return feats, task_targets(data.labels.to(device), spec.kind, spec.num_labels)


def fit_probe_heads(model: InjectedFoundation, train: Mapping[str, TaskData], val: Mapping[str, TaskData],
                    probe: ProbeParams, metric: str, seed: int = 0) -> dict[str, dict[str, float]]:
    """Fit every task's head of ``model`` as the experts stage fits its probe (``fit_probe``: to convergence, L2
    and, for multilabel, thresholds picked on ``val``, ``probe.class_weight``) on the model's current, frozen
    features; returns each head's validation metrics. On the no-injection model (frozen foundation + heads) this is
    the strongest head the server's data gives, and FedKIM's heads start from it (as an expert's head starts from
    its probe, ``experts.head_init``)."""
    out = {}
    for task, split in train.items():
        if task not in val:
            raise DataError(f"FedKIM probe heads: task {task!r} has training rows but no validation rows")
        x, y = (t.cpu() for t in task_features(model, task, split))
        xv, yv = (t.cpu() for t in task_features(model, task, val[task]))
        spec = model.tasks[task]
        head, scores = fit_probe((x, y), (xv, yv), spec.kind, spec.num_labels, probe, metric, seed)
        model.heads[task].load_state_dict(head.state_dict())
        out[task] = {k: float(v) for k, v in scores.items()}
    return out


def fit_head_on(
    model: InjectedFoundation,
    name: str,
    spec: Any,
    train: TaskData,
    val: TaskData | None = None,
    *,
    shots: int | None = None,
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    seed: int = 0,
    class_weight: ClassWeight = "balanced",
) -> dict[str, float]:
    """A held-out task (no client trained on it): add it to ``model`` (the gate routes it from its descriptions
    alone) and fit only its new head on the frozen injected model's features of ``train`` (``shots`` rows, class
    shares kept, when given; classes weighted by their balance there with ``class_weight="balanced"``). Returns
    ``train_loss`` and, with ``val``, ``val_<metric>``."""
    _check_training(epochs, batch_size, lr, weight_decay, f"held-out task {name!r}")
    if shots is not None and shots < 1:
        raise ParamsError(f"held-out task {name!r}: shots={shots} must be >= 1 (or None for the whole split)")
    spec = check_task_spec(name, spec)
    model.add_task(name, spec)
    try:
        feats, labels = task_features(model, name, train.subset(shots, seed))
        device = feats.device
        head = model.heads[name]
        weight = loss_weight(spec.kind, labels, spec.num_labels, class_weight)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        rows = TensorDictDataset({"features": feats}, labels)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for epoch in range(epochs):
                total, seen = 0.0, 0
                for batch in loader(rows, batch_size, shuffle=True, seed=seed + epoch):
                    stop.check("a FedKIM head batch")
                    loss = task_loss(spec.kind, head(batch["features"]), batch["labels"], weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(batch["labels"])
                    seen += len(batch["labels"])
        for p in head.parameters():
            p.grad = None
    except BaseException:
        _drop_task(model, name)  # a failed fit leaves the model as it was
        raise
    metrics = {"train_loss": total / seen}
    if val is not None:
        metrics |= {f"val_{k}": v for k, v in evaluate_injected(model, {name: val})[name].items()}
    return metrics


def _drop_task(model: InjectedFoundation, name: str) -> None:
    if name in model.tasks:
        del model.tasks[name]
        del model.heads[name]
        model._describe()


# --- save / load ---

def save_injected(model: InjectedFoundation, out_dir: Path, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the trainable state (``injected.safetensors``), the frozen client encoders
    (``client_encoders.safetensors``) and a ``fedkim`` manifest with the config into ``out_dir`` (write into a
    fresh folder, e.g. under ``atomic_dir``). Returns the manifest."""
    out_dir = Path(out_dir)
    config = model.config()  # before writing anything: an unsavable client encoder fails here
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(model.trainable_state(), out_dir / TRAINABLE_FILE)
    if len(model.client_encoders):
        frozen = {**{f"{m}.{k}": v for m, e in model.client_encoders.items() for k, v in e.state_dict().items()},
                  **{f"{HEADS_PREFIX}{t}.{k}": v for t, h in model.client_heads.items()
                     for k, v in h.state_dict().items()}}
        save_tensors({k: v.detach().cpu() for k, v in frozen.items()}, out_dir / ENCODERS_FILE)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    manifest = {"kind": KIND, "config": config, "trainable_parameters": trainable,
                "parameters": sum(p.numel() for p in model.parameters()), **(extra or {})}
    return write_manifest(out_dir, manifest)


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"{path}: cannot read the saved tensors ({exc})") from None


def _load_into(module: nn.Module, state: Mapping[str, torch.Tensor], expected: Sequence[str], where: str) -> None:
    missing, extra = sorted(set(expected) - set(state))[:3], sorted(set(state) - set(expected))[:3]
    if missing or extra:
        raise ArtifactError(f"{where}: saved tensors do not match the model (missing {missing}, unexpected {extra})")
    current = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for key in expected:
        if tuple(state[key].shape) != tuple(current[key].shape):
            raise ArtifactError(f"{where}: {key!r} has shape {tuple(state[key].shape)}; the model expects "
                                f"{tuple(current[key].shape)}")
    with torch.no_grad():
        for key in expected:
            current[key].copy_(state[key])


def load_injected(folder: Path, foundation: Foundation) -> InjectedFoundation:
    """Rebuild a saved injected model on ``foundation`` (which must be the one it was trained on, by hash)."""
    folder = Path(folder)
    manifest = read_manifest(folder, kind=KIND)
    config = manifest.get("config")
    if not isinstance(config, dict):
        raise ArtifactError(f"{folder}: the {KIND} manifest has no config")
    if config.get("foundation_sha256") != foundation.sha256:
        raise ArtifactError(f"{folder}: trained on the foundation with sha256 {config.get('foundation_sha256')}; the "
                            f"given one has {foundation.sha256}; re-run the federated stage")
    try:
        tasks = {s["name"]: TaskSpec(**{k: v for k, v in s.items() if k != "name"}) for s in config["tasks"]}
        specs = config["client_encoders"]
        with torch.random.fork_rng(devices=[]):  # random init, overwritten by the saved weights
            encoders = {m: _encoder_from_spec(m, s) for m, s in specs.items()}
            # saved before client heads existed: none
            heads = {t: nn.Linear(encoders[tasks[t].modality].out_dim, tasks[t].num_labels)
                     for t in config.get("client_heads", [])}
        if encoders:
            state = _load(folder / ENCODERS_FILE)
            parts = [(f"{m}.", enc, f"{m} encoder") for m, enc in encoders.items()]
            parts += [(f"{HEADS_PREFIX}{t}.", head, f"client head of {t}") for t, head in heads.items()]
            for prefix, module, what in parts:
                mine = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
                _load_into(module, mine, list(module.state_dict()), f"{folder / ENCODERS_FILE} ({what})")
        model = build_injected(foundation, encoders, tasks, config["num_experts"], config["rank"], config["alpha"],
                               config["targets"], extra_tokens=config["extra_tokens"], client_heads=heads,
                               gate_heads=config["gate_heads"],
                               # saved before the option existed: extra tokens first, the text shifted after them
                               extra_positions=config.get("extra_positions", "first"),
                               max_length=config["max_length"], description_length=config["description_length"],
                               seed=config["seed"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{folder}: the {KIND} manifest's config is incomplete or malformed ({exc!r})") from None
    _load_into(model, _load(folder / TRAINABLE_FILE), model.trainable_names(), str(folder / TRAINABLE_FILE))
    return model
