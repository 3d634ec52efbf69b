"""Interoperability with other tools' checkpoint formats (Hugging Face Llama)."""
