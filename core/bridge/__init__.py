"""HF <-> core conversion, one parameter at a time."""

from core.bridge.convert import export_hf_weights, hf_to_ours_tensors, ours_to_hf_iter
from core.bridge.hf import copy_tokenizer_files, load_hf, read_hf_config, save_hf
from core.bridge.native import load_native, save_native

__all__ = [
    "copy_tokenizer_files",
    "export_hf_weights",
    "hf_to_ours_tensors",
    "load_hf",
    "load_native",
    "ours_to_hf_iter",
    "read_hf_config",
    "save_hf",
    "save_native",
]
