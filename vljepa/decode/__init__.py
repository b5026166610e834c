"""Turning predicted embeddings into text: nearest-neighbour search over a bank of candidates, and on a
stream, selective decoding (when to decode) with timestamped captions and subtitles."""

from vljepa.decode.nearest import CandidateBank
from vljepa.decode.selective import DecodePlan, Online, OnlineDecider, Uniform, Ward, make_policy
from vljepa.decode.stream import Caption, StreamStep, caption_stream, caption_video, embed_stream, save_captions

__all__ = ["CandidateBank", "Caption", "DecodePlan", "Online", "OnlineDecider", "StreamStep", "Uniform", "Ward",
           "caption_stream", "caption_video", "embed_stream", "make_policy", "save_captions"]
