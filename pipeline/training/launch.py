"""Where torchrun placed this process (its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` protocol), read without
importing torch, so the CLI can tell a follower rank cheaply."""

from __future__ import annotations

import os

from pipeline.errors import ConfigError


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun "
                          "or unset it") from None


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's environment, or None outside a multi-process launch."""
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return None
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or not 0 <= rank < world:
        raise ConfigError(f"WORLD_SIZE={world} but RANK is {rank}; launch with torchrun (it sets both)")
    return rank, world, local if local is not None else rank
