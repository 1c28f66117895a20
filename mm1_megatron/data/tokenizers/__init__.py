"""Tokenizers: the interface and synthetic vocabulary (``base``), SentencePiece and Hugging Face (``text``)."""
