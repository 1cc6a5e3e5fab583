"""Checkpoint errors. Every message names the checkpoint file and, where one is
involved, the parameter (its FQN) and says what to do about it."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """Base class: the checkpoint cannot be saved or loaded as asked."""


class CorruptCheckpointError(CheckpointError):
    """A file is truncated, unreadable, or its bytes do not match the stored checksum."""


class MissingEntryError(CheckpointError):
    """The checkpoint lacks a parameter (or state tensor) the model/optimizer has, or the reverse."""


class ShapeMismatchError(CheckpointError):
    """A stored tensor's shape or dtype differs from the live parameter's."""


class AlgorithmMismatchError(CheckpointError):
    """The checkpoint was written by another algorithm (e.g. AdamW state loaded into Lion)."""


__all__ = [
    "AlgorithmMismatchError",
    "CheckpointError",
    "CorruptCheckpointError",
    "MissingEntryError",
    "ShapeMismatchError",
]
