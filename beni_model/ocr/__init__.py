"""OCR as a beni extension ("ocr"): reading heads on the vision tower, their CTC loss, and their reads handed to
the LLM (see extension.py)."""

from beni_model.ocr.extension import OcrExtension, character_token_ids

__all__ = ["OcrExtension", "character_token_ids"]
