"""transformers on the same weights: the correctness and speed reference.

Only tests and benchmarks import this (transformers is an optional dependency,
never on the serving path). `deepseek` (DeepSeek-MoE) has no transformers
class; its decoder equals `DeepseekOcr2TextModel` with greedy top-k routing and
a routed scaling factor of 1 when `norm_topk_prob` is false, so we wrap that
model with an LM head and load our checkpoint into it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from expert_workers.checkpoint import Checkpoint
from expert_workers.spec import ModelSpec


def load_reference(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers model with `generate()` on the checkpoint in `model_dir`."""
    checkpoint = Checkpoint(model_dir)
    if checkpoint.spec.model_type == "deepseek":
        return _deepseek_reference(checkpoint, dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _deepseek_config(spec: ModelSpec):
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig

    moe = spec.moe
    if moe.norm_topk_prob or moe.routed_scaling_factor != 1.0:
        raise ValueError("the transformers reference for deepseek needs norm_topk_prob false and scaling 1.0")
    return DeepseekOcr2TextConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=spec.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        n_shared_experts=moe.shared_intermediate_size // moe.expert_intermediate_size,
        moe_intermediate_size=moe.expert_intermediate_size, routed_scaling_factor=1.0, topk_method="greedy",
        mlp_layer_types=["sparse" if spec.is_moe_layer(i) else "dense" for i in range(spec.num_layers)],
        tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=spec.bos_token_id,
        eos_token_id=list(spec.eos_token_ids) or None,
    )


def _deepseek_reference(checkpoint: Checkpoint, dtype: torch.dtype):
    from torch import nn
    from transformers import GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
        DeepseekOcr2TextModel,
        DeepseekOcr2TextPreTrainedModel,
    )

    class DeepseekMoEForCausalLM(DeepseekOcr2TextPreTrainedModel, GenerationMixin):
        def __init__(self, config):
            super().__init__(config)
            self.model = DeepseekOcr2TextModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                    use_cache=None, logits_to_keep=0, **kwargs):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
            hidden = out.last_hidden_state
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            return CausalLMOutputWithPast(logits=self.lm_head(hidden), cache=out.cache)

    spec = checkpoint.spec
    with torch.device("meta"):
        model = DeepseekMoEForCausalLM(_deepseek_config(spec))
    state = {}
    for name in checkpoint.weight_map:
        if ".experts." not in name:
            state[name] = checkpoint.read(name, dtype=dtype)
    for layer in spec.moe_layers:
        gate_up, down = checkpoint.read_experts(layer, list(range(spec.moe.num_experts)), dtype)
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = gate_up  # [E, 2I, H], gate rows first
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = down  # [E, H, I]
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    # Rotary inverse frequencies are buffers computed at init, not weights: rebuild them off the meta device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model.to(dtype).eval()
