"""The benchmarked models: mptc specs, the matching `transformers` configs, and shared checkpoints.

Both sides run the same weights: mptc initialises the model from its seed and saves a model dir;
the same tensors, renamed (and transposed for GPT-2's Conv1D), are written as a Hugging Face
checkpoint (config.json + model.safetensors) that `from_pretrained` loads. The name mapping lives
here rather than in `mptc.hf`, so the benchmark does not depend on the importer; `prepare` checks
that both sides compute the same logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import mptc
from mptc import spec as S

NESTED = "[1/8, 1/4, 1/2, 1]"

GPT2 = """\
# GPT-2 small (examples/gpt2-small.mpt){note}
let d = {d}

model gpt2_small {{
  vocab = {vocab}
  context = {context}
  width = d
  embed {{ positions = learned, dropout = 0.1 }}
  layers {layers} {{
    norm = layernorm(eps = 1e-5)
    dropout = 0.1
    attention {{ heads = {heads}, mask = causal, bias = true, dropout = 0.1 }}
    mlp {{ hidden = 4 * d, activation = gelu_tanh{nested} }}
  }}
  head lm {{ norm = layernorm(eps = 1e-5), tied = true }}
}}
"""

LLAMA = """\
# A Llama-style decoder (examples/llama-style.mpt){note}
let d = {d}

model llama_style {{
  vocab = {vocab}
  context = {context}
  width = d
  embed {{ positions = rope(theta = 10000.0) }}
  layers {layers} {{
    norm = rmsnorm(eps = 1e-6)
    attention {{ heads = {heads}, kv_heads = {kv_heads}, head_dim = {head_dim}, mask = causal, bias = false }}
    mlp {{ hidden = {hidden}, activation = swiglu, bias = false }}
  }}
  head lm {{ norm = rmsnorm(eps = 1e-6), tied = false }}
}}
"""

SIZES = {  # the shipped examples, and toy versions for the smoke test
    "gpt2": {"d": 768, "vocab": 50257, "context": 1024, "layers": 12, "heads": 12},
    "llama": {"d": 768, "vocab": 32000, "context": 2048, "layers": 12, "heads": 12, "kv_heads": 3, "head_dim": 64,
              "hidden": 2048},
}
TOY = {
    "gpt2": {"d": 64, "vocab": 512, "context": 64, "layers": 2, "heads": 4},
    "llama": {"d": 64, "vocab": 512, "context": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16,
              "hidden": 128},
}
TEMPLATES = {"gpt2": GPT2, "llama": LLAMA}
TITLES = {"gpt2": "GPT-2 small", "llama": "Llama-style"}


def spec_text(family: str, toy: bool = False, layers: int | None = None, nested: bool = False) -> str:
    sizes = dict((TOY if toy else SIZES)[family])
    note = ""
    if layers is not None and layers != sizes["layers"]:
        note = f", {layers} layers instead of {sizes['layers']}"
        sizes["layers"] = layers
    if toy:
        note += ", toy size"
    if nested:
        note += ", MatFormer-nested MLP"
    return TEMPLATES[family].format(note=note, nested=f", nested = {NESTED}" if nested else "", **sizes)


# --- transformers configs and the weight mapping -------------------------------------------------------


def hf_config(spec: S.Spec):
    import transformers as T

    a, m = spec.layers[0].attention, spec.layers[0].mlp
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if spec.embed.positions.kind == "learned":
        return T.GPT2Config(vocab_size=spec.vocab, n_positions=spec.context, n_embd=spec.width,
                            n_layer=spec.n_layers, n_head=a.heads, n_inner=m.hidden, activation_function="gelu_new",
                            layer_norm_epsilon=spec.layers[0].norm.eps, tie_word_embeddings=True, **ids)
    return T.LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.width, intermediate_size=m.hidden,
                         num_hidden_layers=spec.n_layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                         head_dim=a.head_dim, max_position_embeddings=spec.context,
                         rms_norm_eps=spec.layers[0].norm.eps, rope_theta=spec.embed.positions.theta,
                         hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False, **ids)


def hf_state(spec: S.Spec, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mptc parameter names → Hugging Face checkpoint names (GPT-2 or Llama)."""
    out = {}
    if spec.embed.positions.kind == "learned":  # GPT-2: Conv1D weights are (in, out); q, k, v fused
        out["transformer.wte.weight"] = sd["embed.tokens.weight"]
        out["transformer.wpe.weight"] = sd["embed.positions.weight"]
        for i in range(spec.n_layers):
            p, h = f"layers.{i}.", f"transformer.h.{i}."
            qkv = [sd[f"{p}attn.{x}.weight"] for x in "qkv"]
            out[h + "attn.c_attn.weight"] = torch.cat(qkv, 0).t()
            out[h + "attn.c_attn.bias"] = torch.cat([sd[f"{p}attn.{x}.bias"] for x in "qkv"])
            for mine, theirs in (("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
                out[f"{h}{theirs}.weight"] = sd[f"{p}{mine}.weight"].t()
                out[f"{h}{theirs}.bias"] = sd[f"{p}{mine}.bias"]
            for mine, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[f"{h}{theirs}.weight"] = sd[f"{p}{mine}.weight"]
                out[f"{h}{theirs}.bias"] = sd[f"{p}{mine}.bias"]
        out["transformer.ln_f.weight"] = sd["head.norm.weight"]
        out["transformer.ln_f.bias"] = sd["head.norm.bias"]
    else:  # Llama
        out["model.embed_tokens.weight"] = sd["embed.tokens.weight"]
        for i in range(spec.n_layers):
            p, h = f"layers.{i}.", f"model.layers.{i}."
            for x in "qkvo":
                out[f"{h}self_attn.{x}_proj.weight"] = sd[f"{p}attn.{x}.weight"]
            for x in ("up", "gate", "down"):
                out[f"{h}mlp.{x}_proj.weight"] = sd[f"{p}mlp.{x}.weight"]
            out[h + "input_layernorm.weight"] = sd[f"{p}attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = sd[f"{p}mlp_norm.weight"]
        out["model.norm.weight"] = sd["head.norm.weight"]
        out["lm_head.weight"] = sd["head.out.weight"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def touch(model):
    """Read every weight once. Loaders map safetensors files lazily, so a model's first forward pass
    would otherwise fault its weights in and count them as that pass's memory."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.device.type != "meta":
                t.sum()
    return model


def load_hf(path: str | Path, attn: str):
    import transformers as T

    m = T.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn, dtype=torch.float32).eval()
    return touch(m)


def load_mptc(path: str | Path):
    return touch(mptc.load_model(path).eval())


# --- checkpoints shared by the workers -------------------------------------------------------------------


@dataclass
class Prepared:
    family: str
    title: str
    spec_text: str
    mptc_dir: str  # model dir: model.mpt + weights.safetensors
    hf_dir: str  # config.json + model.safetensors
    params: int
    parity: float  # max |logits difference| between the two on a probe batch


def prepare(family: str, root: Path, toy: bool = False, layers: int | None = None) -> Prepared:
    """Write the mptc model dir and the Hugging Face checkpoint of one model; check they agree."""
    from safetensors.torch import save_file

    text = spec_text(family, toy, layers)
    spec = mptc.parse(text)
    model = mptc.build(spec, seed=0).eval()
    mdir, hdir = root / f"{family}-mptc", root / f"{family}-hf"
    mptc.save(model, mdir)
    hdir.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(spec)
    cfg.architectures = ["GPT2LMHeadModel" if family == "gpt2" else "LlamaForCausalLM"]
    cfg.save_pretrained(str(hdir))
    save_file(hf_state(spec, model.state_dict()), str(hdir / "model.safetensors"), metadata={"format": "pt"})
    hf = load_hf(hdir, "eager")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        parity = float((hf(input_ids=ids, attention_mask=mask).logits - model(input_ids=ids, attention_mask=mask))
                       .abs().max())
    (hdir / "bench.json").write_text(json.dumps({"parity": parity}))
    params = sum(p.numel() for p in model.parameters())
    return Prepared(family, TITLES[family], text, str(mdir), str(hdir), params, parity)


def flops(spec: S.Spec, batch: int, seq: int) -> float:
    """Forward FLOPs of one batch: mptc summary's matmul FLOPs per token, with the attention term
    (2·H·(K + Dv)·T per layer and token, no causal halving) at the actual length instead of `context`."""
    s = mptc.summarize(spec)
    att = sum(2 * ly.attention.heads * (ly.attention.head_dim + ly.attention.value_dim) for ly in spec.layers)
    per_token = s.flops_per_token - att * (spec.seq_len or 0) + att * seq
    return float(per_token) * batch * seq
