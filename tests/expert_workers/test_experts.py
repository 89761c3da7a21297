"""ExpertGroup.run: both compute paths (a matmul per hit row, one padded bmm) against a per-pair reference."""

from __future__ import annotations

import pytest
import torch

from expert_workers.experts import ExpertGroup, _batched_pays, swiglu
from router_service.engine import EngineSettings

E, H, I = 8, 32, 16  # noqa: E741


def group(dtype: torch.dtype, hosted: list[int]) -> ExpertGroup:
    gen = torch.Generator().manual_seed(0)
    g = ExpertGroup(E)
    gate_up = torch.randn(len(hosted), 2 * I, H, generator=gen) * 0.2  # [n, 2I, H]
    down = torch.randn(len(hosted), H, I, generator=gen) * 0.2  # [n, H, I]
    g._set(3, hosted, gate_up.to(dtype), down.to(dtype))
    return g


def reference(g: ExpertGroup, hidden, token, expert, weight) -> torch.Tensor:
    """One pair at a time, in fp32."""
    le = g.layers[3]
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    for t, e, w in zip(token.tolist(), expert.tolist(), weight.tolist()):
        r = int(le.slot[e])
        out[t] += w * swiglu(hidden[t : t + 1].float(), le.gate_up[r].float(), le.down[r].float())[0]
    return out


def pairs(T: int, K: int, hosted: list[int], seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen)
    choice = torch.stack([torch.tensor(hosted)[torch.randperm(len(hosted), generator=gen)[:K]] for _ in range(T)])
    token = torch.arange(T).repeat_interleave(K)
    return hidden, token, choice.flatten(), torch.rand(T * K, generator=gen)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 3, 16], ids=lambda t: f"T{t}")
def test_run_matches_per_pair_reference(dtype, tol, T):
    # Hosted out of order (slot rows differ from expert ids): the stacked row of each expert is looked up.
    hosted = [7, 2, 0, 5, 6, 3]
    g = group(dtype, hosted)
    hidden, token, expert, weight = pairs(T, 2, hosted)
    rows = g.layers[3].slot[expert]
    batched = _batched_pays(torch.bincount(rows, minlength=len(hosted)), dtype)
    assert batched == (dtype == torch.bfloat16 and T > 1), "the cases cover both paths"
    out = g.run(3, hidden.to(dtype), token, expert, weight.to(dtype))
    ref = reference(g, hidden.to(dtype), token, expert, weight.to(dtype))
    assert out.dtype == dtype and out.shape == (T, H)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_batched_path_equals_row_loop_in_bf16():
    hosted = list(range(E))
    g = group(torch.bfloat16, hosted)
    hidden, token, expert, weight = pairs(24, 3, hosted)
    counts = torch.bincount(expert, minlength=E)
    assert _batched_pays(counts, torch.bfloat16)  # this batch takes the bmm path
    out = g.run(3, hidden.bfloat16(), token, expert, weight.bfloat16())
    loop = torch.zeros(24, H, dtype=torch.bfloat16)  # what the per-row path computes
    le = g.layers[3]
    for e in hosted:
        sel = expert == e
        y = swiglu(hidden[token[sel]].bfloat16(), le.gate_up[int(le.slot[e])], le.down[int(le.slot[e])])
        loop.index_add_(0, token[sel], y * weight[sel, None].bfloat16())
    torch.testing.assert_close(out.float(), loop.float(), atol=2e-2, rtol=2e-2)


def test_batched_path_with_unhit_rows():
    hosted = [6, 1, 4, 0, 3, 7]
    g = group(torch.bfloat16, hosted)
    hidden, token, expert, weight = pairs(12, 1, [6, 1, 4, 0])  # rows of experts 3 and 7 get no token
    counts = torch.bincount(g.layers[3].slot[expert], minlength=len(hosted))
    assert int((counts == 0).sum()) == 2 and _batched_pays(counts, torch.bfloat16)
    out = g.run(3, hidden.bfloat16(), token, expert, weight.bfloat16())
    torch.testing.assert_close(out.float(), reference(g, hidden.bfloat16(), token, expert, weight.bfloat16()),
                               atol=3e-2, rtol=3e-2)


def test_batched_path_choice():
    full = torch.tensor([3, 2, 4, 1, 2, 3, 1, 2])  # every row hit, evenly
    assert _batched_pays(full, torch.bfloat16) and _batched_pays(full, torch.float16)
    assert not _batched_pays(full, torch.float32), "fp32: the per-row loop is as fast and never pads"
    few = torch.tensor([3, 0, 0, 0, 2, 0, 0, 0])  # 2 of 8 rows hit: bmm would read 4x the weights
    assert not _batched_pays(few, torch.bfloat16)
    skewed = torch.tensor([40, 1, 1, 1, 1, 1, 1, 1])  # padding every row to 40 wastes > 4x
    assert not _batched_pays(skewed, torch.bfloat16)


def test_unhosted_expert_is_named():
    g = group(torch.bfloat16, [0, 1, 2, 3, 4, 5])
    hidden, token, expert, weight = pairs(8, 2, [0, 1, 2, 3, 4, 5])
    expert[5] = 7
    with pytest.raises(KeyError, match=r"layer 3: experts \[7\] are not hosted here"):
        g.run(3, hidden.bfloat16(), token, expert, weight.bfloat16())


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "plain-cpu"])
def test_auto_dtype_policy(monkeypatch, native_bf16):
    import router_service.engine as engine_module

    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    auto = EngineSettings()
    assert auto.torch_dtype("float32", cpu) == torch.float32
    assert auto.torch_dtype("float16", cpu) == torch.float32  # no native fp16 matmul path measured on CPU
    # A bf16 checkpoint computes in bf16 where the CPU has native bf16 matmuls, else in fp32.
    assert auto.torch_dtype("bfloat16", cpu) == (torch.bfloat16 if native_bf16 else torch.float32)
    assert auto.torch_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    assert auto.torch_dtype("float16", torch.device("cuda")) == torch.float16
    assert EngineSettings(dtype="float32").torch_dtype("bfloat16", cpu) == torch.float32


def test_loading_runs_at_the_callers_priority(tiny_model, monkeypatch):
    """A nice-19 loader stalled decoding (priority inversion on the GIL, docs/rebalancing.md): loading runs on
    the calling thread, at its CPU priority."""
    import os
    import threading

    from expert_workers.checkpoint import Checkpoint

    def priority() -> tuple[int, int]:
        tid = threading.get_native_id()
        return tid, os.getpriority(os.PRIO_PROCESS, tid)

    seen = []
    real = ExpertGroup._add

    def spy(self, *args):
        seen.append(priority())
        return real(self, *args)

    monkeypatch.setattr(ExpertGroup, "_add", spy)
    ck = Checkpoint(tiny_model)
    layer = ck.spec.moe_layers[0]
    group = ExpertGroup.load(ck, {layer: [0]}, torch.float32)
    seen.clear()
    group.add(ck, {layer: [1]}, torch.float32)
    assert seen == [priority()]
    assert group.hosted() == {layer: [0, 1]}


def test_adding_and_removing_replicas_equals_loading_them_at_once(tiny_model):
    from expert_workers.checkpoint import Checkpoint

    ck = Checkpoint(tiny_model)
    layer = ck.spec.moe_layers[0]
    E = ck.spec.moe.num_experts
    whole = ExpertGroup.load(ck, {layer: list(range(E))}, torch.float32)
    grown = ExpertGroup.load(ck, {layer: [5, 1]}, torch.float32)
    assert grown.add(ck, {layer: [0, 1, 7, 3, 2, 4, 6]}, torch.float32) > 0  # paced, like a live rebalance
    with pytest.raises(ValueError, match="duty"):
        grown.add(ck, {layer: [1]}, torch.float32, duty=0)
    grown.add(ck, {layer + 1: [2]}, torch.float32)
    assert grown.hosted() == {layer: list(range(E)), layer + 1: [2]}
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, ck.spec.hidden_size, generator=gen)
    token = torch.arange(6).repeat_interleave(2)
    expert = torch.randint(0, E, (12,), generator=gen)
    weight = torch.rand(12, generator=gen)
    torch.testing.assert_close(grown.run(layer, hidden, token, expert, weight),
                               whole.run(layer, hidden, token, expert, weight), atol=0, rtol=0)
    grown.remove({layer: [0, 3]})
    kept = expert[(expert != 0) & (expert != 3)]
    assert grown.hosted()[layer] == sorted(set(range(E)) - {0, 3})
    sel = (expert != 0) & (expert != 3)
    torch.testing.assert_close(grown.run(layer, hidden, token[sel], kept, weight[sel]),
                               whole.run(layer, hidden, token[sel], kept, weight[sel]), atol=0, rtol=0)


def test_replicas_load_into_free_rows_and_unloading_frees_them_without_copying(tiny_model):
    """A worker's layer has room beyond its first replicas: a load writes free rows, an unload frees its rows
    and the next load reuses them; the rows of the replicas that stay are never copied (same storage), and
    outputs equal a group that loaded the same set at once."""
    from expert_workers.checkpoint import Checkpoint

    ck = Checkpoint(tiny_model)
    layer = ck.spec.moe_layers[0]
    E = ck.spec.moe.num_experts
    g = ExpertGroup.load(ck, {layer: [0, 1, 2, 3]}, torch.float32, spare_rows=0.5)
    le = g.layers[layer]
    assert le.gate_up.shape[0] == 6 and le.free_rows == [4, 5]  # 4 replicas and half as many spare rows
    storage = le.gate_up.untyped_storage().data_ptr(), le.down.untyped_storage().data_ptr()
    rows_before = {e: int(le.slot[e]) for e in range(4)}

    def same_storage(le) -> bool:
        return (le.gate_up.untyped_storage().data_ptr(), le.down.untyped_storage().data_ptr()) == storage

    g.add(ck, {layer: [6]}, torch.float32, duty=1.0)
    le = g.layers[layer]
    assert same_storage(le) and int(le.slot[6]) == 4
    g.remove({layer: [1, 2]})
    le = g.layers[layer]
    assert same_storage(le) and sorted(le.free_rows) == [rows_before[1], rows_before[2], 5]
    g.add(ck, {layer: [5, 7, 4]}, torch.float32, duty=1.0)  # exactly the three free rows
    le = g.layers[layer]
    assert same_storage(le) and le.free_rows == []
    assert {int(le.slot[e]) for e in (4, 5, 7)} == {rows_before[1], rows_before[2], 5}
    assert all(int(le.slot[e]) == rows_before[e] for e in (0, 3))  # the replicas that stayed never moved
    assert g.hosted() == {layer: [0, 3, 4, 5, 6, 7]}

    whole = ExpertGroup.load(ck, {layer: list(range(E))}, torch.float32)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(5, ck.spec.hidden_size, generator=gen)
    token = torch.arange(5).repeat_interleave(2)
    expert = torch.tensor([0, 3, 4, 5, 6, 7, 0, 7, 5, 3])
    weight = torch.rand(10, generator=gen)
    # The same kernel on the same weights, one pair at a time: only the row a replica sits in differs.
    torch.testing.assert_close(g.run(layer, hidden, token, expert, weight),
                               whole.run(layer, hidden, token, expert, weight), atol=0, rtol=0)
    with pytest.raises(KeyError, match=r"experts \[1\] are not hosted"):
        g.run(layer, hidden, token[:2], torch.tensor([1, 0]), weight[:2])

    # More than the free rows: the layer grows into bigger tensors, every hosted replica keeps its row.
    rows = {e: int(le.slot[e]) for e in g.hosted()[layer]}
    g.add(ck, {layer: [1, 2]}, torch.float32, duty=1.0)
    le = g.layers[layer]
    assert not same_storage(le) and all(int(le.slot[e]) == r for e, r in rows.items())
    assert g.hosted()[layer] == list(range(E))
    torch.testing.assert_close(g.run(layer, hidden, token, expert, weight),
                               whole.run(layer, hidden, token, expert, weight), atol=0, rtol=0)
    g.remove({layer: list(range(E))})
    assert layer not in g.layers  # a layer left empty frees its memory
