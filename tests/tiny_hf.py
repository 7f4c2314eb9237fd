"""Tiny, randomly initialised Hugging Face text encoders saved to a folder: real CLIP and T5 code
paths for the ``hf`` text encoder, with no network and no downloaded weights."""

from __future__ import annotations

from pathlib import Path

from diffx import text


WORDS = ("<pad> <s> </s> <unk> a an the small large red green blue yellow magenta cyan circle square "
         "triangle at on in top bottom left right center").split()


def _tokenizer():
    """A word-level fast tokenizer that wraps every prompt in <s> ... </s>, as CLIP's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def save_clip(path: Path, hidden: int = 16, full: bool = False) -> Path:
    """A CLIPTextModel (or, with ``full``, a whole CLIPModel with a vision tower) and its tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    if full:
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                      patch_size=16)
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=8))
    else:
        model = CLIPTextModel(text)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def save_t5(path: Path, hidden: int = 24) -> Path:
    """A T5EncoderModel and its tokenizer."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(WORDS), d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=1, num_heads=3,
                      pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def save_all(root: Path) -> dict[str, Path]:
    return {"clip": save_clip(root / "clip"), "t5": save_t5(root / "t5"), "full_clip": save_clip(root / "full", full=True)}


def encoders(paths: dict[str, Path] | None = None, max_length: int = 12) -> dict:
    """One small encoder of every kind; the Hugging Face ones only when ``paths`` (``save_all``) is given."""
    found = {"tiny": text.Tiny(width=16, depth=1, heads=2, max_length=max_length)}
    if paths:
        found["clip"] = text.HF(str(paths["clip"]), max_length=max_length)
        found["t5"] = text.HF(str(paths["t5"]), max_length=max_length)
        found["multi"] = text.Multi({"clip": found["clip"], "tiny": text.Tiny(width=8, depth=1, heads=2)}, width=16)
    return found
