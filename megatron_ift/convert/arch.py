"""One declarative name/shape map per architecture, shared by import and export.

Each :class:`TensorMap` ties one megatron-core tensor, named by its *sharded key* in the TP1/PP1
key space of ``GPTModel.sharded_state_dict()``, to the Hugging Face tensors it is made of, with
the HF shapes written as dimension symbols and one of four layout transforms:

* ``copy``: the same tensor on both sides;
* ``vocab``: Megatron pads the vocabulary rows with zeros up to the padded size, HF does not;
* ``qkv``: megatron's fused ``linear_qkv``, per query group ``[q heads of the group; k; v]``;
* ``gate_up``: megatron's ``linear_fc1`` for SwiGLU, ``[gate; up]``.

Per-layer tensors (HF names containing ``{i}``) are stored by megatron-core as one global tensor
with a leading layer axis, ``[num_layers, ...]``, one chunk per layer. The sharded keys are the
same for the local and the Transformer Engine layer specs (the local spec maps its
``input_layernorm`` / ``pre_mlp_layernorm`` to TE's fused ``layer_norm_weight`` keys), and they do
not depend on the tensor/pipeline layout, which is what lets a checkpoint written here load at
any TP/PP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_ift.convert import ConversionError
from megatron_ift.models.config import ModelConfig

LAYER = "{i}"
TRANSFORMS = ("copy", "vocab", "qkv", "gate_up")
CONDITIONS = ("always", "qkv_bias", "untied")

# Dimension symbols of the HF shapes below.
#   H: hidden size, V: true vocabulary, F: MLP width,
#   Q: query heads x head dim, KV: key/value groups x head dim.


def dims(cfg: ModelConfig) -> dict[str, int]:
    """Values of the dimension symbols for ``cfg``."""
    head = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    return {
        "H": cfg.hidden_size,
        "V": cfg.vocab_size,
        "F": cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        "Q": cfg.num_attention_heads * head,
        "KV": cfg.query_groups * head,
    }


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor and the HF tensors it is made of."""

    megatron: str
    """Sharded key (TP1/PP1 global key space), e.g. ``decoder.layers.mlp.linear_fc2.weight``."""
    hf: tuple[tuple[str, tuple[str, ...]], ...]
    """(HF name, HF shape in dimension symbols); ``{i}`` in a name is the layer number."""
    transform: str = "copy"
    """``copy``, ``vocab``, ``qkv`` or ``gate_up`` (module docstring)."""
    when: str = "always"
    """``always``, ``qkv_bias`` (only with ``add_qkv_bias``) or ``untied`` (only without tied
    embeddings)."""

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS or self.when not in CONDITIONS:
            raise ValueError(f"{self.megatron}: transform {self.transform!r} / condition "
                             f"{self.when!r} not in {TRANSFORMS} / {CONDITIONS}")
        if (self.transform in ("qkv", "gate_up")) != (len(self.hf) > 1):
            raise ValueError(f"{self.megatron}: {self.transform} with {len(self.hf)} HF tensors")

    @property
    def per_layer(self) -> bool:
        return LAYER in self.hf[0][0]

    def applies(self, cfg: ModelConfig) -> bool:
        if self.when == "always":
            return True
        if self.when == "qkv_bias":
            return cfg.add_qkv_bias
        return not cfg.tie_embeddings  # untied

    def hf_names(self, layer: Optional[int]) -> list[str]:
        if layer is None:
            return [name for name, _ in self.hf]
        return [name.replace(LAYER, str(layer)) for name, _ in self.hf]

    def hf_shapes(self, cfg: ModelConfig) -> list[tuple[int, ...]]:
        d = dims(cfg)
        return [tuple(d[s] for s in shape) for _, shape in self.hf]

    def megatron_shape(self, cfg: ModelConfig, vocab_rows: Optional[int] = None) -> tuple[int, ...]:
        """Shape of one layer's slice (without the leading layer axis).

        Args:
            vocab_rows: rows of a ``vocab`` tensor (the padded vocabulary); default: TP1 padding.
        """
        shapes = self.hf_shapes(cfg)
        if self.transform == "vocab":
            rows = vocab_rows if vocab_rows is not None else cfg.padded_vocab_size(1)
            return (rows, *shapes[0][1:])
        if self.transform in ("qkv", "gate_up"):
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        return shapes[0]

    def to_megatron(self, tensors: Sequence[torch.Tensor], cfg: ModelConfig,
                    vocab_rows: Optional[int] = None) -> torch.Tensor:
        """HF tensors (in ``hf`` order) -> the megatron tensor (one layer's slice)."""
        if self.transform == "copy":
            return tensors[0]
        if self.transform == "vocab":
            (t,) = tensors
            rows = vocab_rows if vocab_rows is not None else cfg.padded_vocab_size(1)
            out = t.new_zeros((rows, *t.shape[1:]))
            out[: t.shape[0]] = t
            return out
        if self.transform == "gate_up":
            return torch.cat(tensors, dim=0)
        if self.transform == "qkv":
            q, k, v = tensors
            groups = cfg.query_groups
            rest = q.shape[1:]
            # [ng, (np/ng) * hn | hn | hn, ...]: megatron's per-group interleaving.
            fused = torch.cat(
                [q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest),
                 v.reshape(groups, -1, *rest)],
                dim=1,
            )
            return fused.reshape(-1, *rest)
        raise ValueError(f"unknown transform {self.transform!r}")

    def to_hf(self, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        """The megatron tensor (one layer's slice) -> contiguous HF tensors in ``hf`` order."""
        shapes = self.hf_shapes(cfg)
        if self.transform == "copy":
            return [tensor.contiguous()]
        if self.transform == "vocab":
            return [tensor[: shapes[0][0]].contiguous()]
        if self.transform == "gate_up":
            return [t.contiguous() for t in torch.split(tensor, [s[0] for s in shapes], dim=0)]
        if self.transform == "qkv":
            groups = cfg.query_groups
            rest = tensor.shape[1:]
            per_group = [s[0] // groups for s in shapes]  # (np/ng) * hn, hn, hn
            q, k, v = torch.split(tensor.reshape(groups, -1, *rest), per_group, dim=1)
            return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]
        raise ValueError(f"unknown transform {self.transform!r}")


@dataclass(frozen=True)
class Architecture:
    """An HF model family and its tensor map."""

    name: str
    """Our name (``--arch``): ``llama``, ``mistral``, ``qwen2``."""
    model_type: str
    """HF ``config.json`` ``model_type``."""
    hf_class: str
    """HF ``architectures[0]`` of the causal-LM model."""
    tensors: tuple[TensorMap, ...]
    extra_state: tuple[str, ...]
    """Per-layer ``ShardedObject`` keys (linear layers' ``_extra_state``, None on our models;
    Transformer Engine accepts None for them)."""
    ignored_hf: tuple[str, ...] = ()
    """Regexes of HF tensors that carry no trainable weight (dropped on import)."""

    def active(self, cfg: ModelConfig) -> list[TensorMap]:
        return [t for t in self.tensors if t.applies(cfg)]

    def expected_hf(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of every tensor the HF checkpoint must hold, in HF's usual order."""
        out: dict[str, tuple[int, ...]] = {}
        for tmap, layer in self.items(cfg):
            out.update(zip(tmap.hf_names(layer), tmap.hf_shapes(cfg)))
        return out

    def items(self, cfg: ModelConfig) -> list[tuple[TensorMap, Optional[int]]]:
        """(map, layer) of every megatron tensor slice, in HF's order: embeddings, layer by
        layer, then the final norm and the output layer."""
        active = self.active(cfg)
        whole = [(t, None) for t in active if not t.per_layer]
        before = [item for item in whole if item[0].megatron.startswith("embedding.")]
        after = [item for item in whole if not item[0].megatron.startswith("embedding.")]
        layers = [(t, i) for i in range(cfg.num_layers) for t in active if t.per_layer]
        return before + layers + after

    def tolerated_hf(self, cfg: ModelConfig, name: str) -> bool:
        """HF tensors that may be present without being converted (rotary buffers, a tied head)."""
        if any(re.fullmatch(p, name) for p in self.ignored_hf):
            return True
        return cfg.tie_embeddings and any(
            name in t.hf_names(None) for t in self.tensors if t.when == "untied"
        )


def _layer(name: str) -> str:
    return f"model.layers.{LAYER}.{name}"


_LAYERS = "decoder.layers."

_LLAMA_TENSORS = (
    TensorMap("embedding.word_embeddings.weight", (("model.embed_tokens.weight", ("V", "H")),),
              "vocab"),
    TensorMap(_LAYERS + "self_attention.linear_qkv.layer_norm_weight",
              ((_layer("input_layernorm.weight"), ("H",)),)),
    TensorMap(_LAYERS + "self_attention.linear_qkv.weight",
              ((_layer("self_attn.q_proj.weight"), ("Q", "H")),
               (_layer("self_attn.k_proj.weight"), ("KV", "H")),
               (_layer("self_attn.v_proj.weight"), ("KV", "H"))), "qkv"),
    TensorMap(_LAYERS + "self_attention.linear_qkv.bias",
              ((_layer("self_attn.q_proj.bias"), ("Q",)),
               (_layer("self_attn.k_proj.bias"), ("KV",)),
               (_layer("self_attn.v_proj.bias"), ("KV",))), "qkv", when="qkv_bias"),
    TensorMap(_LAYERS + "self_attention.linear_proj.weight",
              ((_layer("self_attn.o_proj.weight"), ("H", "Q")),)),
    TensorMap(_LAYERS + "mlp.linear_fc1.layer_norm_weight",
              ((_layer("post_attention_layernorm.weight"), ("H",)),)),
    TensorMap(_LAYERS + "mlp.linear_fc1.weight",
              ((_layer("mlp.gate_proj.weight"), ("F", "H")),
               (_layer("mlp.up_proj.weight"), ("F", "H"))), "gate_up"),
    TensorMap(_LAYERS + "mlp.linear_fc2.weight", ((_layer("mlp.down_proj.weight"), ("H", "F")),)),
    TensorMap("decoder.final_layernorm.weight", (("model.norm.weight", ("H",)),)),
    TensorMap("output_layer.weight", (("lm_head.weight", ("V", "H")),), "vocab", when="untied"),
)

_EXTRA_STATE = tuple(
    _LAYERS + f"{m}._extra_state"
    for m in ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
              "mlp.linear_fc2")
)

_ROTARY_BUFFERS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

LLAMA = Architecture("llama", "llama", "LlamaForCausalLM", _LLAMA_TENSORS, _EXTRA_STATE,
                     _ROTARY_BUFFERS)
MISTRAL = Architecture("mistral", "mistral", "MistralForCausalLM", _LLAMA_TENSORS, _EXTRA_STATE,
                       _ROTARY_BUFFERS)
# Qwen2 is Llama with biases on q/k/v (``add_qkv_bias``), which the shared map already covers.
QWEN2 = Architecture("qwen2", "qwen2", "Qwen2ForCausalLM", _LLAMA_TENSORS, _EXTRA_STATE,
                     _ROTARY_BUFFERS)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLAMA, MISTRAL, QWEN2)}


def get_architecture(name: str) -> Architecture:
    """The architecture called ``name`` (our name or an HF ``model_type``)."""
    for arch in ARCHITECTURES.values():
        if name in (arch.name, arch.model_type):
            return arch
    raise ConversionError(
        f"architecture {name!r} is not supported; supported: {', '.join(ARCHITECTURES)} "
        "(Llama 1-3.x, Mistral, Qwen2 and models with the same layout)"
    )


def is_model_key(key: str) -> bool:
    """Whether a dist-checkpoint key holds model weights (not optimizer, RNG or extra state)."""
    return key.startswith(("embedding.", "decoder.", "output_layer.")) and "_extra_state" not in key
