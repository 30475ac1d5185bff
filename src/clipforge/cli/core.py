"""Core sub-commands: info, convert, embed-text, embed-image."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from clipforge.cli.common import add_json_flag, add_long_flag, add_model_flags, emit, model_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="describe a checkpoint: architecture, parameters, preprocessing, tokenizer"
    )
    p.add_argument("model", help="checkpoint path or 'default'")
    p.add_argument("--vocab", default=None, help="vocabulary for a bare state dict")
    p.add_argument("--preset", default=None, help="architecture preset of a bare state dict (else inferred)")
    add_json_flag(p)
    p.set_defaults(run=lambda a: info(a.model, a.vocab, a.preset, a.json))

    p = sub.add_parser("convert", help="convert a checkpoint (OpenAI, OpenCLIP, Hugging Face, clipforge)")
    p.add_argument("src", help="checkpoint to read")
    p.add_argument(
        "--out", required=True, help="output directory (clipforge) or file (openai: .pt/.safetensors)"
    )
    p.add_argument(
        "--format",
        choices=["clipforge", "openai"],
        default="clipforge",
        help="clipforge: a directory that clipforge and Hugging Face transformers (ViT towers) load; "
        "openai: a state dict in OpenAI's layout, which OpenAI's and OpenCLIP's code load",
    )
    p.add_argument("--preset", default=None, help="architecture preset of a bare state dict (else inferred)")
    p.add_argument(
        "--activation",
        choices=["quick_gelu", "gelu"],
        default=None,
        help="activation of a checkpoint that does not record it",
    )
    p.add_argument("--vocab", default=None, help="vocabulary to save with the model")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="store the model for inputs of this many pixels (position embeddings interpolated, "
        "preprocessing following)",
    )
    add_json_flag(p)
    p.set_defaults(
        run=lambda a: convert(
            a.src, Path(a.out), a.format, a.preset, a.activation, a.vocab, a.json, image_size=a.image_size
        )
    )

    p = sub.add_parser("embed-text", help="embed texts into the model's space (normalised vectors)")
    p.add_argument("texts", nargs="+", help="texts to embed")
    add_model_flags(p, fast=True)
    add_long_flag(p)
    p.add_argument("--out", default=None, help="write the (N, D) float32 array to this .npy file")
    add_json_flag(p)
    p.set_defaults(
        run=lambda a: embed(a.model, model_options(a), texts=a.texts, out=a.out, as_json=a.json, long=a.long)
    )

    p = sub.add_parser("embed-image", help="embed images into the model's space (normalised vectors)")
    p.add_argument("images", nargs="+", help="image files")
    add_model_flags(p, fast=True)
    p.add_argument("--out", default=None, help="write the (N, D) float32 array to this .npy file")
    add_json_flag(p)
    p.set_defaults(run=lambda a: embed(a.model, model_options(a), images=a.images, out=a.out, as_json=a.json))


def info(model: str, vocab: str | None, preset: str | None, as_json: bool) -> int:
    from clipforge.checkpoint import read_checkpoint, resolve
    from clipforge.tokenizer import get_tokenizer

    loaded = read_checkpoint(resolve(model), preset=preset)
    cfg = loaded.config
    tok = loaded.tokenizer or (get_tokenizer(vocab, cfg.text.context_length) if vocab else None)
    counts = {"visual": 0, "text": 0, "other": 0}
    for k, v in loaded.state_dict.items():
        counts[k.split(".")[0] if k.split(".")[0] in counts else "other"] += v.numel()
    result = {
        "source": loaded.source,
        "config": cfg.to_dict(),
        "parameters": {**counts, "total": sum(counts.values())},
        "tokenizer": None
        if tok is None
        else {"kind": tok.kind, "vocab_size": tok.vocab_size, "context_length": tok.context_length},
    }
    v, t = cfg.vision, cfg.text
    tower = {
        "vit": lambda: f"ViT {v.patch_size}px patches, width {v.width}",
        "resnet": lambda: f"ResNet {list(v.layers)}, width {v.width}",
        "efficientnet": lambda: "EfficientNet-Lite0",
    }[v.kind]()
    text_kind = f"BERT, {t.pooling} pooling, " if getattr(t, "kind", None) == "bert" else ""
    text = (
        f"{loaded.source}\n"
        f"  image tower: {tower}, {v.image_size}px, {counts['visual']:,} parameters\n"
        f"  text tower:  {text_kind}{t.layers} layers, width {t.width}, context {t.context_length}, "
        f"vocab {t.vocab_size}, {counts['text']:,} parameters\n"
        f"  embedding:   {cfg.embed_dim}-d, activation {cfg.activation}\n"
        f"  preprocess:  {cfg.preprocess.resize_mode} {cfg.preprocess.interpolation}, mean {cfg.preprocess.mean}, "
        f"std {cfg.preprocess.std}\n"
        f"  tokenizer:   {'none (pass --vocab)' if tok is None else f'{tok.kind}, {tok.vocab_size} tokens'}"
    )
    emit(result, as_json, text)
    return 0


def convert(
    src: str,
    out: Path,
    fmt: str,
    preset: str | None,
    activation: str | None,
    vocab: str | None,
    as_json: bool,
    image_size: int | None = None,
) -> int:
    import warnings

    from clipforge.checkpoint import (
        build_model,
        choose_tokenizer,
        read_checkpoint,
        resolve,
        save_model,
        save_openai,
    )

    loaded = read_checkpoint(resolve(src), preset=preset, activation=activation, image_size=image_size)
    model = build_model(loaded)
    if fmt == "clipforge":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said below in the CLI's own words
            tok = choose_tokenizer(loaded.tokenizer, vocab, loaded.config, loaded.source)
        if tok is None:
            warnings.warn("no vocabulary saved with the model: pass --vocab to include one", stacklevel=1)
        save_model(model, out, tokenizer=tok)
    else:
        save_openai(model, out)
    emit({"source": loaded.source, "out": str(out), "format": fmt}, as_json, f"wrote {out} ({fmt})")
    return 0


def embed(
    model: str,
    options: dict,
    *,
    texts: list[str] | None = None,
    images: list[str] | None = None,
    out: str | None = None,
    as_json: bool = False,
    long: str = "truncate",
) -> int:
    from clipforge.encoder import Encoder

    # Only the tower that runs is read: embedding texts needs no image weights in memory, and vice versa.
    enc = Encoder.load(model, towers="text" if texts is not None else "image", long=long, **options)
    items = texts if texts is not None else images
    vectors = enc.embed_texts(texts) if texts is not None else enc.embed_images(images)
    if out:
        np.save(out, vectors)
    key = "text" if texts is not None else "image"
    result = {
        "model": enc.name,
        "dim": enc.dim,
        "items": [
            {key: item, **({} if out else {"embedding": [round(float(x), 7) for x in vec]})}
            for item, vec in zip(items, vectors)
        ],
        **({"out": out} if out else {}),
    }
    lines = [f"{item}: {vec[:4].round(4).tolist()}..." for item, vec in zip(items, vectors)]
    emit(result, as_json, f"wrote {out}" if out else "\n".join(lines))
    return 0
