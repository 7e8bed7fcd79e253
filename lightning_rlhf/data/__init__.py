"""Data layer: record formats -> tokenised examples -> collators -> ``RLHFDataModule``.

See docs/internals.md (section data/) for the batch contract.
"""

from lightning_rlhf.data.collate import (
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    model_inputs,
    pack,
    pad,
)
from lightning_rlhf.data.datamodule import RLHFDataModule
from lightning_rlhf.data.records import (
    DataFormatError,
    Records,
    Where,
    detect_format,
    index_records,
    load_records,
    parse_record,
    read_records,
)
from lightning_rlhf.data.tokenize import ChatTemplateError, Encoder, TokenizedRecords, tokenize_records

__all__ = [
    "ChatTemplateError",
    "DataFormatError",
    "Encoder",
    "PreferenceCollator",
    "PromptCollator",
    "RLHFDataModule",
    "SFTCollator",
    "Records",
    "TokenizedRecords",
    "Where",
    "detect_format",
    "index_records",
    "load_records",
    "model_inputs",
    "pack",
    "pad",
    "parse_record",
    "read_records",
    "tokenize_records",
]
