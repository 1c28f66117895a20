"""Tokenizers: the interface and the synthetic vocabulary (``base``), SentencePiece and
Hugging Face (``text``)."""
