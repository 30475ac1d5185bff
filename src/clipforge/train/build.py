"""The model and tokenizer a run starts from: a preset with a vocabulary trained on the captions, or `--init`."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from clipforge import paths
from clipforge.checkpoint import build_model, read_checkpoint, resolve
from clipforge.model import CLIP, CLIPConfig, create_model, get_config
from clipforge.model.pretrained import TOWER_DIRS
from clipforge.model.resize import with_context_length
from clipforge.tokenizer import AnyTokenizer, Tokenizer, get_tokenizer
from clipforge.train.config import TrainConfig
from clipforge.train.vocab import build_tokenizer, read_captions

SIGLIP_SCALE_INIT, SIGLIP_BIAS_INIT = math.log(10.0), -10.0  # the SigLIP paper's initial temperature and bias


def model_config(name_or_path: str) -> CLIPConfig:
    """A preset name, or a JSON file holding a CLIPConfig (for architectures that are not presets)."""
    if not name_or_path.endswith(".json"):
        return get_config(name_or_path)
    p = Path(name_or_path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"model config not found: {p}")
    try:
        return CLIPConfig.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"{p}: not a model config ({e})") from None


def _from_scratch_config(cfg: TrainConfig) -> CLIPConfig:
    mcfg = model_config(cfg.model)
    if cfg.image_size is not None:
        mcfg = mcfg.replace(vision={"image_size": cfg.image_size})
    if cfg.context_length is not None:
        mcfg = mcfg.replace(text={"context_length": cfg.context_length})
    if cfg.loss == "sigmoid":
        mcfg = mcfg.replace(logit_scale_init=SIGLIP_SCALE_INIT, logit_bias_init=SIGLIP_BIAS_INIT)
    return mcfg


def run_tokenizer(
    cfg: TrainConfig,
    run: Path,
    context_length: int,
    default_vocab_size: int,
    captions: Sequence[str] | None,
    is_main: bool,
    barrier: Callable[[], None],
) -> Tokenizer:
    """The run's tokenizer, saved in run/tokenizer: an explicit `vocab`, the one a resumed run saved, or one
    trained by rank 0 on the training captions while the other ranks wait."""
    saved = run / "tokenizer"
    if cfg.vocab is not None:
        tok = Tokenizer.from_pretrained(cfg.vocab, context_length=context_length)
    elif (saved / "vocab.json").exists():
        tok = Tokenizer.from_pretrained(saved, context_length=context_length)
    else:
        if is_main:
            texts = list(captions) if captions is not None else read_captions(cfg.data)
            build_tokenizer(texts, cfg.vocab_size or default_vocab_size, context_length).save(saved)
        barrier()
        return Tokenizer.from_pretrained(saved, context_length=context_length)
    if is_main and not (saved / "vocab.json").exists():
        tok.save(saved)
    return tok


def towers_folder(towers: str) -> Path:
    return paths.towers_dir() if towers == "auto" else Path(towers).expanduser()


def _pretrained_towers_model(
    cfg: TrainConfig, run: Path, is_main: bool
) -> tuple[CLIP, AnyTokenizer, set[str]]:
    """The preset with its towers' pretrained weights (LiT's starting point) and the text tower's own tokenizer;
    the projections (and the logit scale) are new, drawn from the run's seed, so seeds differ in them too."""
    mcfg = _from_scratch_config(cfg)
    folder = towers_folder(cfg.towers)
    model = create_model(mcfg, seed=cfg.seed, pretrained=folder).train()
    if cfg.lock_text_head:
        proj = model.text.text_projection
        if proj.shape[0] != proj.shape[1]:
            raise ValueError(
                f"lock_text_head keeps the text tower's own space: embed_dim must be its width {proj.shape[0]}, "
                f"not {proj.shape[1]}"
            )
        with torch.no_grad():
            proj.copy_(torch.eye(proj.shape[0]))
    tok = get_tokenizer(folder / TOWER_DIRS[mcfg.text.kind], context_length=mcfg.text.context_length)
    if is_main and not (run / "tokenizer").exists():
        tok.save(run / "tokenizer")
    fresh = {"text.text_projection", "logit_scale", "logit_bias"}
    fresh |= {f"visual.{n}" for n in model.visual.head_names}
    return model, tok, {n for n, _ in model.named_parameters() if n not in fresh}


def initial_model(
    cfg: TrainConfig,
    run: Path,
    captions: Sequence[str] | None,
    is_main: bool,
    barrier: Callable[[], None],
) -> tuple[CLIP, Tokenizer, set[str]]:
    """(model in fp32, tokenizer, names of the parameters loaded from --init)."""
    if cfg.init is None and cfg.towers is not None:
        return _pretrained_towers_model(cfg, run, is_main)
    if cfg.init is None:
        mcfg = _from_scratch_config(cfg)
        tok = run_tokenizer(
            cfg, run, mcfg.text.context_length, mcfg.text.vocab_size, captions, is_main, barrier
        )
        mcfg = mcfg.replace(
            text={
                "vocab_size": tok.vocab_size,
                "sot_token_id": tok.sot_token_id,
                "eot_token_id": tok.eot_token_id,
            }
        )
        return create_model(mcfg, seed=cfg.seed), tok, set()
    loaded = read_checkpoint(resolve(cfg.init))
    if cfg.context_length is not None:  # Long-CLIP: fine-tune stretched positions at the longer context
        config, sd = with_context_length(loaded.config, loaded.state_dict, cfg.context_length)
        loaded = dataclasses.replace(loaded, config=config, state_dict=sd)
    model = build_model(loaded).train()  # fp32 master weights whatever the file's dtype
    if loaded.tokenizer is None and cfg.vocab is None:
        raise ValueError(
            f"{loaded.source} carries no vocabulary: pass vocab=PATH (--vocab) for its tokenizer"
        )
    ctx = loaded.config.text.context_length
    if cfg.vocab is not None:
        tok = Tokenizer.from_pretrained(cfg.vocab, context_length=ctx)
    else:
        tok = loaded.tokenizer
        tok.context_length = ctx  # the checkpoint's own, unless --context-length changed it
        if is_main:
            tok.save(run / "tokenizer")
    if tok.vocab_size != loaded.config.text.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} tokens but {loaded.source} expects {loaded.config.text.vocab_size}"
        )
    if cfg.loss == "sigmoid" and model.logit_bias is None:
        model.logit_bias = nn.Parameter(torch.tensor(SIGLIP_BIAS_INIT))
        model.config = model.config.replace(logit_bias_init=SIGLIP_BIAS_INIT)
    return model, tok, {n for n, _ in model.named_parameters() if n in loaded.state_dict}
