"""Data stage: load task sources, split, shard, fingerprint; read the prepared splits back."""

from __future__ import annotations

from components.data.datasets import TaskData, load_shards, load_split, read_manifest
from components.fingerprint import (
    array_content_hash,
    code_hash,
    json_hash,
    sha256_bytes,
    sha256_file,
    tree_hash,
)
from components.data.loaders import Pool, RawTask, load_source
from components.data.prepare import prepare_data
from components.data.shards import partition
from components.data.splits import dedup, make_splits, split_task, stratified_split

__all__ = [
    "Pool",
    "RawTask",
    "TaskData",
    "array_content_hash",
    "code_hash",
    "dedup",
    "json_hash",
    "load_shards",
    "load_source",
    "load_split",
    "make_splits",
    "partition",
    "prepare_data",
    "read_manifest",
    "sha256_bytes",
    "sha256_file",
    "split_task",
    "stratified_split",
    "tree_hash",
]
