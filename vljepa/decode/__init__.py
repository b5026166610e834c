"""Turning predicted embeddings into text: nearest-neighbour search over a bank of candidates."""

from vljepa.decode.nearest import CandidateBank

__all__ = ["CandidateBank"]
