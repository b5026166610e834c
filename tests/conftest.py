"""Shared fixtures: a tiny model config of the real classes, one tiny VLJepa built once per
session (real frozen all-MiniLM-L6-v2 targets, a small random ViT), and a tiny built-in world."""

from __future__ import annotations

import pytest
import torch

from vljepa.config import ModelConfig, RunConfig, load_config

# One intra-op thread: the tensors here are tiny, and on a small machine a second OpenMP thread only
# spins against whatever else runs. No test's outcome depends on the thread count.
torch.set_num_threads(1)

# A model small enough to build and run in well under a second once MiniLM is loaded:
# 32 px images in 2 x 2 patches of 16 px, one-block ViT and predictor, a 16-d shared space.
TINY_MODEL_OVERRIDES = [
    "model.vision.kind=vit",
    "model.vision.image_size=32",
    "model.vision.patch_size=16",
    "model.vision.dim=32",
    "model.vision.depth=1",
    "model.vision.heads=2",
    "model.predictor.dim=32",
    "model.predictor.depth=1",
    "model.predictor.heads=2",
    "model.embed_dim=16",
    "model.target_head_dim=32",
    "model.text.path=package:all-minilm-l6-v2",
]


def tiny_overrides(target_head: str = "token", *extra: str) -> list[str]:
    """Dotted overrides that describe the tiny model (plus ``extra``)."""
    return [*TINY_MODEL_OVERRIDES, f"model.target_head={target_head}", *extra]


def tiny_run_config(target_head: str = "token", *extra: str) -> RunConfig:
    """A full run config around the tiny model."""
    return load_config(None, tiny_overrides(target_head, *extra))


def tiny_model_config(target_head: str = "token", *extra: str) -> ModelConfig:
    """The tiny model's config."""
    return tiny_run_config(target_head, *extra).model


@pytest.fixture(scope="session")
def make_tiny_config():
    """Factory: ``make_tiny_config(target_head="token", *overrides) -> ModelConfig``."""
    return tiny_model_config


@pytest.fixture(scope="session")
def make_tiny_overrides():
    """Factory: ``make_tiny_overrides(target_head="token", *extra) -> list[str]`` for the CLI."""
    return tiny_overrides


@pytest.fixture(scope="session")
def tiny_model():
    """One tiny VLJepa (token target head) in eval mode; tests must not change it in place."""
    from vljepa.models.vljepa import VLJepa

    torch.manual_seed(0)
    return VLJepa(tiny_model_config("token")).eval()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The built-in world at 32 px: train 48, test 16, comp 12 images."""
    from vljepa.data.world import generate_world

    root = tmp_path_factory.mktemp("tiny_world")
    return generate_world(root, seed=0, n_train=48, n_test=16, n_comp=12, image_size=32)
