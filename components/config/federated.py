"""params/federated.yaml: FedKIM, federated clients (hospitals) and the injection of their knowledge into the
foundation (M3OE)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from components.config.base import Strict
from components.config.training import ClassWeight, TrainerParams


def _injection_trainer() -> TrainerParams:
    return TrainerParams(max_epochs=10, batch_size=32, lr=1e-3, max_train_samples=256)


# The clients' small text encoder (components.federated.clients builds it).
TextEncoderKind = Literal["bert", "ngram"]


class ClientParams(Strict):
    epochs: int = Field(1, ge=1, description="Local epochs per round (E).")
    batch_size: int = Field(32, ge=1, description="Local batch size.")
    lr: float = Field(1e-3, gt=0, description="Local AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Local AdamW weight decay.")
    mu: float = Field(0.0, ge=0, description="FedProx proximal term μ (0 = FedAvg).")
    max_train_samples: int | None = Field(None, ge=1, description="Cap on each client's rows per task.")
    class_weight: ClassWeight = Field(
        "balanced", description="balanced: each client weighs its classes by its own shard's balance (a Dirichlet "
                                "shard is skewed); none: unweighted.")
    image_channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1,
                                      description="Widths of the clients' small image CNN.")
    text_encoder: TextEncoderKind = Field(
        "ngram", description="The clients' small text encoder: ngram (fastText: the foundation tokenizer's tokens and "
                             "hashed n-grams, ngram_buckets x ngram_dim) or bert (the foundation's layers text_layers "
                             "with a word table factorised to embedding_rank; set text_lr: null with it).")
    text_layers: list[int] = Field(default_factory=lambda: [0], min_length=1,
                                   description="Foundation layers copied into the clients' bert text encoder.")
    embedding_rank: int = Field(32, ge=1, description="Rank of the bert text encoder's factorised word embedding.")
    ngram_buckets: int = Field(65536, ge=1, description="Hash buckets of the ngram text encoder's n-grams.")
    ngram_dim: int = Field(32, ge=1, description="Width of the ngram text encoder's embeddings.")
    ngram_n: int = Field(2, ge=1, le=3, description="Longest n-gram of the ngram text encoder (1: tokens only).")
    text_lr: float | None = Field(0.1, gt=0, description="Local learning rate of text tasks (their encoder and "
                                  "head): 0.1 suits the ngram encoder's embedding bags; null: lr.")


class InjectionParams(Strict):
    num_experts: int = Field(4, ge=1, description="LoRA experts E in every targeted foundation layer (M3OE).")
    rank: int = Field(4, ge=1, description="Rank r of each expert.")
    alpha: float = Field(8.0, gt=0, description="LoRA scale numerator (scale = alpha / r).")
    targets: list[str] = Field(default_factory=lambda: ["query", "key", "value", "attention.output.dense",
                                                        "intermediate.dense", "output.dense"], min_length=1,
                               description="Attention and feed-forward Linear layers that get the mixture.")
    extra_tokens: int = Field(1, ge=1, description="Tokens a projected client feature adds to the input.")
    client_heads: bool = Field(
        False, description="The injected heads also read the aggregated client model's log-probabilities of the "
                           "sample (its heads were trained on every client's rows; the server's heads see its small "
                           "split only); false: the client encoders' tokens alone, as in the paper (with it, worse: "
                           "bench/results/fedkim_variants_client_heads*.json).")
    preserve: float = Field(10.0, ge=0, description="Weight of the knowledge-preservation term on text-task rows: "
                            "KL from the no-injection model's predictions to the injected model's (Learning without "
                            "Forgetting); 0: off.")
    trainer: TrainerParams = Field(default_factory=_injection_trainer,
                                   description="Server training of experts, gate, projections and heads.")


class FederatedParams(Strict):
    rounds: int = Field(3, ge=1, description="Federated rounds R.")
    min_clients: int | None = Field(None, ge=1, description="A round completes when at least this many clients "
                                    "answered (default: all of data.federation.num_clients).")
    max_norm: float | None = Field(None, gt=0, description="Reject a client update farther than this (L2) from the "
                                   "global model; NaN/inf updates are always rejected.")
    timeout_s: float | None = Field(None, gt=0, description="A client slower than this in a round counts as missing.")
    client: ClientParams = Field(default_factory=ClientParams, description="Local training on each client.")
    injection: InjectionParams = Field(default_factory=InjectionParams, description="M3OE injection on the server.")
    server_fraction: float = Field(0.5, gt=0, lt=1, description="Share of each task's validation split the server "
                                   "trains the injection on; the rest validates it.")
    clients_from: str | None = Field(None, description="A Flower run's output-dir (payload.pt and reports.json, "
                                     "written by the ServerApp across the hospitals): the stage injects that "
                                     "aggregate instead of simulating the clients in-process. Its sites must build "
                                     "the client model as this stage does (same tasks, client settings and seed).")
    held_out: list[str] = Field(default_factory=list, description="Active tasks no client trains on: a few-shot head "
                                "on the injected model (and on the non-injected one, to compare).")
    held_out_shots: int | None = Field(64, ge=1, description="Rows a held-out task's head is fitted on.")
    modality_descriptions: dict[str, str] = Field(default_factory=dict, description="Task -> a description of its "
                                                  "input modality (the gate's query); default '<modality> input'.")

    @field_validator("clients_from")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_absolute():
            raise ValueError(f"clients_from must be an absolute path (the stage may run in another folder); got "
                             f"{value!r}")
        return value
