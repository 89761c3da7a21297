"""Random-weight checkpoints: presets parse, both expert layouts round-trip, errors name their cause."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from cluster import make_model as mm
from cluster.make_model import PRESETS, default_model_dir, make_model, preset_hash, write_tokenizer
from expert_workers.checkpoint import Checkpoint, CheckpointError
from expert_workers.spec import ConfigError, ModelSpec, load_spec

TINY = ["tiny", "mixtral-tiny", "qwen2-moe-tiny"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """make_model with memoised results: several tests share one build of each variant."""
    built: dict[tuple, Path] = {}

    def _build(preset="tiny", **kw) -> Path:
        kw = {"layout": "per_expert", "dtype": PRESETS[preset].dtype, "seed": 0,
              "max_shard_bytes": mm.DEFAULT_MAX_SHARD_BYTES, **kw}  # one key per distinct build
        key = (preset, *sorted(kw.items()))
        if key not in built:
            built[key] = make_model(preset, tmp_path_factory.mktemp("model") / "m", **kw)
        return built[key]

    return _build


def expected_names(spec: ModelSpec, layout: str) -> set[str]:
    """The tensor names real checkpoints of each family use, written out independently of WeightNames."""
    moe_block = {"deepseek": "mlp", "qwen2_moe": "mlp", "mixtral": "block_sparse_moe"}[spec.model_type]
    projs = ("w1", "w3", "w2") if spec.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    shared = {"deepseek": "shared_experts", "qwen2_moe": "shared_expert"}.get(spec.model_type)
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        names |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                  f"{p}.self_attn.o_proj.weight"}
        for x in "qkv":
            names.add(f"{p}.self_attn.{x}_proj.weight")
            if spec.model_type == "qwen2_moe":
                names.add(f"{p}.self_attn.{x}_proj.bias")
        if i not in spec.moe_layers:
            names |= {f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
            continue
        names.add(f"{p}.{moe_block}.gate.weight")
        if layout == "fused":
            names |= {f"{p}.mlp.experts.gate_up_proj", f"{p}.mlp.experts.down_proj"}
        else:
            names |= {f"{p}.{moe_block}.experts.{e}.{x}.weight" for e in range(spec.moe.num_experts) for x in projs}
        if shared:
            names |= {f"{p}.mlp.{shared}.{x}_proj.weight" for x in ("gate", "up", "down")}
        if spec.model_type == "qwen2_moe":
            names.add(f"{p}.mlp.shared_expert_gate.weight")
    return names


# --- presets ----------------------------------------------------------------------------------


def test_tiny_preset_matches_the_brief():
    spec = PRESETS["tiny"].spec()
    assert (spec.model_type, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.num_layers) == (
        "deepseek", 64, 4, 4, 4)
    assert spec.moe_layers == (1, 2, 3) and spec.intermediate_size == 128
    assert (spec.moe.num_experts, spec.moe.top_k, spec.moe.expert_intermediate_size) == (8, 2, 32)
    assert spec.moe.shared_intermediate_size == 64 and not spec.moe.norm_topk_prob
    assert spec.max_position_embeddings == 512 and spec.vocab_size == 129280


@pytest.mark.parametrize("name", TINY)
def test_tiny_family_presets_parse(name):
    spec = PRESETS[name].spec()
    assert spec.model_type == PRESETS[name].model_type and spec.moe.num_experts == 8
    assert spec.moe.shared_expert_gated == (name == "qwen2-moe-tiny")
    assert spec.moe_layers == ((0, 1, 2, 3) if name == "mixtral-tiny" else (1, 2, 3))


def decode_flops_per_token(spec: ModelSpec) -> tuple[int, int]:
    """(multiply-adds of everything but the LM head, of the LM head) for one decoded token."""
    H, D, Q, N = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    attention = H * (Q + 2 * N) * D + Q * D * H
    body = 0
    for i in range(spec.num_layers):
        body += attention
        if spec.is_moe_layer(i):
            moe = spec.moe
            active = moe.top_k * moe.expert_intermediate_size + moe.shared_intermediate_size
            body += moe.num_experts * H + 3 * H * active
        else:
            body += 3 * H * spec.intermediate_size
    return body, spec.vocab_size * H


def test_deepseek_moe_mini_keeps_real_proportions():
    preset = PRESETS["deepseek-moe-mini"]
    spec = preset.spec()
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.head_dim) == (768, 12, 12, 64)
    assert spec.moe_layers == tuple(range(1, 12)) and spec.intermediate_size == 4096
    assert (spec.moe.num_experts, spec.moe.top_k, spec.moe.expert_intermediate_size) == (32, 6, 512)
    assert spec.moe.shared_intermediate_size == 1024 and spec.dtype == "bfloat16"
    assert (preset.tokenizer, spec.vocab_size) == ("mixtral", 32000)
    body, head = decode_flops_per_token(spec)
    assert head / (body + head) < 0.2, head / (body + head)
    # The oracle itself: DeepSeek-MoE-16B's published shape gives a head share under 1/10.
    real = dataclasses.replace(preset, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=16,
                               intermediate_size=10944, num_experts=64, expert_intermediate_size=1408,
                               vocab_size=102400).spec()
    body, head = decode_flops_per_token(real)
    assert head / (body + head) < 0.1


def test_preset_hash_tracks_every_field():
    tiny = PRESETS["tiny"]
    assert preset_hash(tiny) == preset_hash(dataclasses.replace(tiny))
    assert preset_hash(tiny) != preset_hash(dataclasses.replace(tiny, rms_norm_eps=1e-5))


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("name", TINY)
def test_round_trip_through_checkpoint(build, name, layout):
    ckpt = Checkpoint(build(name, layout=layout))
    spec = ckpt.spec
    assert spec == dataclasses.replace(PRESETS[name].spec(), bos_token_id=0, eos_token_ids=(1,))
    assert set(ckpt.weight_map) == expected_names(spec, layout)
    assert ckpt.read("model.layers.0.input_layernorm.weight").eq(1).all()  # RMSNorm weights start at one
    for layer in spec.moe_layers:
        assert ckpt.expert_layout(layer) == layout
        gate_up, down = ckpt.read_experts(layer, [0, 5, 7], torch.float32)
        I, H = spec.moe.expert_intermediate_size, spec.hidden_size
        assert gate_up.shape == (3, 2 * I, H) and down.shape == (3, H, I)
        assert 0.015 < float(gate_up.std()) < 0.025  # initializer_range 0.02
        # Every expert is a different draw.
        assert not torch.equal(gate_up[0], gate_up[1]) and not torch.equal(down[1], down[2])
    gate = ckpt.read(spec.names.router_gates(spec.moe_layers[0])[0])
    assert float(gate.std()) > 0.1  # larger than 0.02, so routing is not near-uniform


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_layouts_hold_identical_experts(build, dtype):
    per, fused = (Checkpoint(build(layout=layout, dtype=dtype)) for layout in ("per_expert", "fused"))
    assert per.spec.dtype == fused.spec.dtype == dtype
    assert per.read("model.embed_tokens.weight").dtype == DTYPES[dtype]
    experts = list(range(per.spec.moe.num_experts))
    for layer in per.spec.moe_layers:
        a, b = per.read_experts(layer, experts, DTYPES[dtype]), fused.read_experts(layer, experts, DTYPES[dtype])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # The stored values are the fp32 draws rounded once to the target dtype.
    ref = Checkpoint(build(layout="per_expert", dtype="float32"))
    name = per.spec.names.expert(1, 3)[2]
    assert torch.equal(per.read(name), ref.read(name).to(DTYPES[dtype]))


def test_seed_changes_every_tensor(build):
    a, b = Checkpoint(build()), Checkpoint(build(seed=1))
    for name in ["model.embed_tokens.weight", "model.layers.2.mlp.experts.4.down_proj.weight"]:
        assert not torch.equal(a.read(name), b.read(name))


def test_sharded_index_covers_every_tensor(build):
    out = build(layout="fused", max_shard_bytes=4 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    held, total = {}, 0
    for file in files:
        with safe_open(out / file, "pt") as f:
            for name in f.keys():
                held[name] = file
                total += f.get_tensor(name).nbytes
    assert index["weight_map"] == held and index["metadata"]["total_size"] == total
    single = Checkpoint(build(layout="fused"))
    sharded = Checkpoint(out)
    assert set(single.weight_map) == set(held)
    for name in ["lm_head.weight", "model.layers.3.mlp.experts.gate_up_proj", "model.layers.0.mlp.up_proj.weight"]:
        assert torch.equal(single.read(name), sharded.read(name))


# --- tokenizers -------------------------------------------------------------------------------


def test_tiny_tokenizer_loads_and_covers_the_vocab(build):
    out = build(dtype="bfloat16")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tok.encode("Mixture-of-Experts models route each token to a few experts.").ids
    assert 5 < len(ids) and max(ids) < 128000
    assert tok.decode(ids).strip() == "Mixture-of-Experts models route each token to a few experts."
    top = max(tok.get_vocab(with_added_tokens=True).values())
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == top + 1 == 129280  # exactly covers the added tokens
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert tok.id_to_token(0) == "<｜begin▁of▁sentence｜>" and tok.id_to_token(1) == "<｜end▁of▁sentence｜>"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 1}
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok.token_to_id(tok_config["bos_token"]) == 0 and tok_config["add_bos_token"] is True


def test_mixtral_tokenizer_conversion(tmp_path):
    pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    bos, eos = write_tokenizer("mixtral", tmp_path, vocab_size=32000)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == 32000 and (bos, eos) == (1, 2)
    import mistral_common

    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    text = "The quick brown fox jumps over the lazy dog, 12345 times."
    assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text)
    with pytest.raises(ValueError, match="vocab_size 31999 is too small"):
        write_tokenizer("mixtral", tmp_path / "small", vocab_size=31999)


# --- errors -----------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_names_tensor_and_place(build, tmp_path):
    out = _copy(build(dtype="bfloat16"), tmp_path / "m")
    tensors = load_file(out / "model.safetensors")
    missing = "model.layers.2.mlp.experts.5.up_proj.weight"
    del tensors[missing]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"'{missing}'.*{out}"):
        Checkpoint(out).read_experts(2, [4, 5], torch.float32)


@pytest.mark.parametrize("layout, name", [
    ("per_expert", "model.layers.1.mlp.experts.0.down_proj.weight"),
    pytest.param("fused", "model.layers.1.mlp.experts.down_proj"),
])
def test_tensor_missing_from_its_shard_names_the_file(build, tmp_path, layout, name):
    out = _copy(build(layout=layout, max_shard_bytes=4 << 20), tmp_path / "m")
    file = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(out / file)
    del tensors[name]  # the index still points at this shard
    save_file(tensors, out / file)
    with pytest.raises(CheckpointError, match=rf"'{name}'.*'{file}'"):
        Checkpoint(out).read_experts(1, [0], torch.float32)


def test_wrong_shape_names_tensor_and_file(build, tmp_path):
    out = _copy(build(dtype="bfloat16"), tmp_path / "m")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.3.mlp.experts.0.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()  # [H, I-1]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"'{name}' in 'model.safetensors' has shape \(64, 31\)"):
        Checkpoint(out).read_experts(3, [0], torch.float32)


@pytest.mark.parametrize("change, field", [
    (dict(model_type="gpt_oss"), "model_type"),
    (dict(top_k=9), "num_experts_per_tok"),
    (dict(first_dense=5), "first_k_dense_replace"),
    (dict(num_heads=5), "num_attention_heads"),
])
def test_bad_config_raises_config_error_before_writing(tmp_path, change, field):
    preset = dataclasses.replace(PRESETS["tiny"], **change)
    with pytest.raises(ConfigError, match=f"'{field}'"):
        make_model(preset, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_mixtral_preset_rejects_shared_experts(tmp_path):
    with pytest.raises(ConfigError, match="'num_shared_experts'"):
        make_model(dataclasses.replace(PRESETS["mixtral-tiny"], num_shared_experts=1), tmp_path / "m")


def test_config_json_written_by_make_model_parses_back(build):
    spec = load_spec(build("qwen2-moe-tiny", layout="per_expert"))
    assert spec.attention_bias and spec.moe.shared_intermediate_size == 64 and spec.sliding_window is None


# --- atomic publishing and the cached default ---------------------------------------------------


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(path, tensors, *args):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(mm, "_write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_model("tiny", tmp_path / "m", dtype="bfloat16")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_overwrite(build, tmp_path):
    out = _copy(build(dtype="bfloat16"), tmp_path / "m")
    with pytest.raises(FileExistsError):
        make_model("tiny", out, dtype="bfloat16")
    make_model("tiny", out, dtype="bfloat16", layout="fused", max_shard_bytes=4 << 20, overwrite=True)
    assert Checkpoint(out).expert_layout(1) == "fused" and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old siblings left


def test_default_model_dir_builds_once_and_survives_a_race(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_SERVE_CACHE", str(tmp_path))
    out = default_model_dir()
    assert out == tmp_path / "models" / f"tiny-{preset_hash(PRESETS['tiny'])}"
    assert Checkpoint(out).spec == load_spec(out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == out and (out / "model.safetensors").stat().st_mtime_ns == stamp

    # Another process publishes the same model while this one is still writing weights.
    shutil.rmtree(out)
    real_write = mm._write_weights

    def racing(tmp, *args, **kw):
        real_write(tmp, *args, **kw)
        shutil.copytree(tmp, out)

    monkeypatch.setattr(mm, "_write_weights", racing)
    assert default_model_dir() == out
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # the loser's temp dir is gone


# --- cross-check with transformers --------------------------------------------------------------


@pytest.mark.parametrize("name, layout", [("mixtral-tiny", "fused"), ("qwen2-moe-tiny", "per_expert")])
def test_transformers_loads_every_tensor(build, name, layout):
    transformers = pytest.importorskip("transformers")
    out = build(name, layout=layout)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    state = model.state_dict()
    gate_up, down = Checkpoint(out).read_experts(2, list(range(8)), torch.float32)
    assert torch.equal(state["model.layers.2.mlp.experts.gate_up_proj"], gate_up)
    assert torch.equal(state["model.layers.2.mlp.experts.down_proj"], down)


CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi — ça va?"},
        {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Count to 3"}]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_chat_template_renders_as_transformers_renders_it(preset, tmp_path):
    """Every preset ships its family's chat template; ours and transformers' apply_chat_template give the same
    text and token ids, with and without the generation prompt, with a system prompt and without."""
    transformers = pytest.importorskip("transformers")
    from cluster.chat_templates import CHAT_TEMPLATES
    from router_service.tokenizer import Tokenizer

    p = PRESETS[preset]
    write_tokenizer(p.tokenizer, tmp_path, vocab_size=p.vocab_size, chat_template=CHAT_TEMPLATES[p.model_type])
    ours = Tokenizer.from_model_dir(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in (CHAT, CHAT[1:2]):
        for add_generation_prompt in (True, False):
            text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours.chat_template.render(messages, add_generation_prompt) == text
            ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert ours.apply_chat_template(messages, add_generation_prompt) == list(ids)
    assert "Answer briefly." in ours.chat_template.render(CHAT)  # the system prompt is not dropped


def test_chat_templates_refuse_other_roles(tmp_path):
    from cluster.chat_templates import CHAT_TEMPLATES
    from router_service.chat_template import ChatTemplate, ChatTemplateError

    for family, source in CHAT_TEMPLATES.items():
        template = ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"})
        with pytest.raises(ChatTemplateError, match="unsupported role tool"):
            template.render([{"role": "tool", "content": "42"}])
