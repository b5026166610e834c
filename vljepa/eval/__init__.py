"""Evaluation metrics over embeddings and strings: retrieval, zero-shot classification, VQA."""
