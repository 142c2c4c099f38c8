"""SepLLM-NeoX: a GPT-NeoX-style pretraining framework with SepLLM attention."""

__version__ = "0.1.0"
