"""Reading and writing models on disk.

clipforge's own format is a directory that Hugging Face transformers also loads (config.json,
model.safetensors, tokenizer files, preprocessor_config.json) plus `clipforge.json`, which records the full
config (activation and preprocessing included) and the weights' layout:

- ViT image towers: weights in Hugging Face's CLIPModel names, so `CLIPModel.from_pretrained(dir)` works.
- ResNet image towers (which transformers lacks): weights in OpenAI's layout in `openai_model.safetensors`, which
  OpenAI's `build_model` and OpenCLIP read. With neither config.json nor a weights file of a name it knows,
  `CLIPModel.from_pretrained(dir)` raises OSError instead of building a randomly initialised ViT.
- Pretrained-tower kinds (EfficientNet-Lite, BERT): weights in clipforge's own names, no config.json either; the
  tokenizer is the tokenizer.json the text tower reads (WordPiece for BERT).

Foreign inputs: OpenAI `.pt` (state dicts and TorchScript archives), OpenCLIP state dicts (.pt/.bin/.safetensors,
or a directory with open_clip_config.json) and Hugging Face directories. No code from a checkpoint runs: pickles
load with weights_only=True and TorchScript archives are read for their tensors (torchscript_reader.py).

Each layout is a reader module (`probe(path)`, `read(path, options)`): clipforge_dir, open_clip_dir, hf_dir and
state_dict_file (any bare weights file; TorchScript archives through torchscript_reader). They share common.py;
read.py picks the reader and builds the model; save.py writes.
"""

from clipforge.checkpoint.common import (
    FORMAT_FILE,
    FORMAT_VERSION,
    OPENAI_WEIGHTS_FILE,
    WEIGHTS_FILE,
    Loaded,
    choose_tokenizer,
    read_state_dict,
)
from clipforge.checkpoint.read import build_model, load, read_checkpoint, resolve
from clipforge.checkpoint.save import export_state_dict, save_model, save_openai
from clipforge.model.convert import CheckpointError

__all__ = [
    "FORMAT_FILE",
    "FORMAT_VERSION",
    "OPENAI_WEIGHTS_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "Loaded",
    "build_model",
    "choose_tokenizer",
    "export_state_dict",
    "load",
    "read_checkpoint",
    "read_state_dict",
    "resolve",
    "save_model",
    "save_openai",
]
