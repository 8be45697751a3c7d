"""Shared test setup. Nothing may download at test time: the Hugging Face libraries run offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
