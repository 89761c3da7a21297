"""The CPU kernels (expert_workers/kernels.py, csrc/cpu_kernels.cpp) against plain torch, and their fallback.

Each backend this machine can build is checked against an fp32 torch reference of the same inputs: a
kernel accumulates in fp32 in its own order, so results differ from torch's in rounding only. fp32 is
compared at 1e-5 relative (a few ulps over K-term sums); bf16 at the rounding of a bf16 output (2^-8
relative, doubled for the intermediate bf16 activation in the MoE).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from expert_workers import kernels

BACKENDS = {"amx": torch.bfloat16, "fma": torch.float32, "dot:bfloat16": torch.bfloat16, "dot:float32": torch.float32}
HERE = kernels.available_backends()
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -7)}


def test_a_backend_is_built_on_x86_with_a_compiler():
    """On the machines this project is developed and tested on, the kernels must actually run (else every
    test below would pass vacuously through skips)."""
    import platform
    import shutil

    if platform.machine() != "x86_64" or shutil.which("c++") is None or os.environ.get(kernels.ENV) == "torch":
        pytest.skip("no x86-64 compiler here: plain torch is the documented path")
    assert {"fma", "dot:float32"} <= set(HERE), HERE  # every x86-64 CPU this runs on has at least AVX2 + FMA


def test_pack_amx_layout_by_hand():
    # W [16, 32]: w[n, k] = 100 n + k. Tile (0, 0) row kp holds (w[n, 2kp], w[n, 2kp + 1]) for n = 0..15.
    w = (100 * torch.arange(16)[:, None] + torch.arange(32)[None, :]).float()
    tiles = kernels.pack_amx(w)
    assert tiles.shape == (1, 1, 16, 32)
    assert tiles[0, 0, 0, :4].tolist() == [0, 1, 100, 101]  # n=0: k=0,1; n=1: k=0,1
    assert tiles[0, 0, 3, 30:].tolist() == [1506, 1507]  # kp=3, n=15: k=6,7
    stacked = kernels.pack_amx(torch.stack([w, w + 1]))  # a stack of experts keeps its leading dim
    assert stacked.shape == (2, 1, 1, 16, 32) and torch.equal(stacked[1], tiles + 1)


def test_pack_panels_layout_by_hand():
    # W [32, 3]: w[n, k] = 100 n + k. Line k of panel nb holds w[16 nb + c, k] for c = 0..15.
    w = (100 * torch.arange(32)[:, None] + torch.arange(3)[None, :]).float()
    panels = kernels.pack_panels(w)
    assert panels.shape == (2, 3, 16)
    assert panels[0, 0, :3].tolist() == [0, 100, 200]  # k=0: n=0, 1, 2
    assert panels[1, 2, 15].item() == 3102  # panel 1, k=2, n=31
    stacked = kernels.pack_panels(torch.stack([w, w + 1]))  # a stack of experts keeps its leading dim
    assert stacked.shape == (2, 2, 3, 16) and torch.equal(stacked[1], panels + 1)


def _weights(backend: str, w: torch.Tensor) -> torch.Tensor:
    return kernels.pack_amx(w) if backend == "amx" else kernels.pack_panels(w) if backend == "fma" else w


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (3, 48, 96), (8, 32, 64), (17, 80, 32), (40, 96, 128), (5, 20, 40)],
                         ids=lambda v: str(v))
def test_linear_matches_torch(backend, M, N, K):
    if backend not in HERE:
        pytest.skip(f"{backend} is not built for this CPU")
    if backend == "amx" and (N % 16 or K % 32):
        pytest.skip("amx takes multiples of 16 x 32 only (prepare_linear keeps other shapes on torch)")
    if backend == "fma" and N % 16:
        pytest.skip("fma takes multiples of 16 features only (prepare_linear keeps other shapes on dot)")
    dtype = BACKENDS[backend]
    gen = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=gen).to(dtype), torch.randn(N, K, generator=gen).to(dtype)
    got = torch.ops.moe_serve_cpu.linear(x, _weights(backend, w), backend.split(":")[0])
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), **TOL[dtype])


def test_fma_row_bits_do_not_depend_on_the_batch():
    """fma sums each output over k in order in one vector lane, whatever the row blocking and K chunking (6 or
    12 rows per block, chunks only when there are several blocks), so a row's result is the same bits alone as
    inside any batch: identical by construction, hence exact equality on any CPU."""
    if "fma" not in HERE:
        pytest.skip("fma is not built for this CPU")
    gen = torch.Generator().manual_seed(5)
    plain = torch.randn(48, 300, generator=gen)  # K = 300: a partial last chunk of 128 lines
    w = kernels.pack_panels(plain)
    x = torch.randn(40, 300, generator=gen)
    alone = torch.cat([torch.ops.moe_serve_cpu.linear(x[m : m + 1], w, "fma") for m in range(40)])
    torch.testing.assert_close(alone, F.linear(x, plain), **TOL[torch.float32])
    for M in (6, 7, 13, 40):
        assert torch.equal(torch.ops.moe_serve_cpu.linear(x[:M], w, "fma"), alone[:M]), M
    empty = torch.ops.moe_serve_cpu.linear(x[:13, :0], kernels.pack_panels(plain[:, :0]), "fma")  # K = 0
    assert torch.equal(empty, torch.zeros(13, 48))


def test_fp32_experts_that_do_not_fit_panels_stay_on_dot():
    if "fma" not in HERE:
        pytest.skip("fma is not built for this CPU")
    fit, unfit = _experts(2, 32, 16, torch.float32), _experts(2, 20, 16, torch.float32)  # H = 20: no panels
    assert kernels.prepare_experts(*fit)[2] == "fma" and kernels.prepare_experts(*fit)[0].shape == (2, 2, 32, 16)
    gate_up, down, backend = kernels.prepare_experts(*unfit)
    assert backend == "dot" and gate_up is unfit[0] and down is unfit[1]


def _experts(n: int, H: int, I: int, dtype: torch.dtype, seed: int = 0):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2 * I, H, generator=gen) * 0.1).to(dtype), (torch.randn(n, H, I, generator=gen) * 0.1).to(dtype)


def _moe_reference(hidden, gate_up, down, row, token, weight):
    """One pair at a time in fp32, with the activation rounded to the compute dtype as the kernel does."""
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    for r, t, w in zip(row.tolist(), token.tolist(), weight.tolist()):
        gate, up = F.linear(hidden[t].float(), gate_up[r].float()).chunk(2)
        act = (F.silu(gate) * up).to(hidden.dtype).float()
        out[t] += w * F.linear(act, down[r].float())
    return out


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("T,K", [(1, 2), (7, 3), (40, 2)])
def test_moe_matches_pairwise_reference(backend, T, K):
    if backend not in HERE:
        pytest.skip(f"{backend} is not built for this CPU")
    dtype, n, H, I = BACKENDS[backend], 6, 64, 32  # noqa: E741
    gate_up, down = _experts(n, H, I, dtype)
    gen = torch.Generator().manual_seed(T)
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    row = torch.stack([torch.randperm(n, generator=gen)[:K] for _ in range(T)]).flatten()  # [P]
    token = torch.arange(T).repeat_interleave(K)
    weight = torch.rand(T * K, generator=gen)
    name = backend.split(":")[0]
    got = kernels.moe(hidden, _weights(name, gate_up), _weights(name, down), name, row, token, weight)
    torch.testing.assert_close(got.float(), _moe_reference(hidden, gate_up, down, row, token, weight), **TOL[dtype])
    empty = kernels.moe(hidden, _weights(name, gate_up), _weights(name, down), name, row[:0], token[:0], weight[:0])
    assert torch.equal(empty, torch.zeros_like(hidden))  # tokens with no pair get zeros


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_moe_bits_do_not_depend_on_where_experts_are_hosted(backend):
    """A replica set loaded in another order (a live rebalance) must give identical bits: the kernel sums
    each token's pairs in pair order, whatever their rows."""
    if backend not in HERE:
        pytest.skip(f"{backend} is not built for this CPU")
    dtype, n, H, I = BACKENDS[backend], 5, 64, 32  # noqa: E741
    gate_up, down = _experts(n, H, I, dtype, seed=4)
    perm = torch.tensor([3, 0, 4, 1, 2])  # new row of each expert
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(9, H, generator=gen).to(dtype)
    row = torch.randint(0, n, (27,), generator=gen)
    token, weight = torch.arange(9).repeat_interleave(3), torch.rand(27, generator=gen)
    name = backend.split(":")[0]
    inv = torch.argsort(perm)  # row -> expert
    a = kernels.moe(hidden, _weights(name, gate_up), _weights(name, down), name, row, token, weight)
    b = kernels.moe(hidden, _weights(name, gate_up[inv]), _weights(name, down[inv]), name, perm[row], token, weight)
    assert torch.equal(a, b)


def test_bad_inputs_name_what_is_wrong():
    if "dot:float32" not in HERE:
        pytest.skip("no kernels built here")
    gate_up, down = _experts(2, 16, 8, torch.float32)
    hidden = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="names hosted row 5 of 2"):
        kernels.moe(hidden, gate_up, down, "dot", torch.tensor([5]), torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="names token 7 of 2"):
        kernels.moe(hidden, gate_up, down, "dot", torch.tensor([1]), torch.tensor([7]), torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="unknown backend 'avx9'"):
        torch.ops.moe_serve_cpu.linear(hidden, hidden, "avx9")
    if "fma" in HERE:
        with pytest.raises(RuntimeError, match=r"fma weight must be packed \[.., N/16, K, 16\]"):
            torch.ops.moe_serve_cpu.linear(hidden, torch.randn(2, 16, 8), "fma")
        with pytest.raises(RuntimeError, match="backend fma computes fp32 only"):
            torch.ops.moe_serve_cpu.linear(hidden.bfloat16(), kernels.pack_panels(torch.randn(16, 16)).bfloat16(), "fma")


def test_prepared_weights_run_on_the_kernel_and_keep_torch_semantics():
    """prepare_linear/linear: the same result as F.linear, any leading dims, bias added; fp32 weights of 16k
    features go to fma panels, others to dot, whose big batches run oneDNN's linear on a prepacked copy; dtypes
    without a kernel stay on torch."""
    gen = torch.Generator().manual_seed(2)
    for dtype, features in [(torch.float32, 32), (torch.float32, 20), (torch.bfloat16, 32)]:
        w = torch.randn(features, 64, generator=gen).to(dtype)
        bias = torch.randn(features, generator=gen).to(dtype)
        prepared = kernels.prepare_linear(w)
        if dtype == torch.float32 and "fma" in HERE:
            assert prepared.backend == ("fma" if features % 16 == 0 else "dot"), prepared.backend
        if isinstance(prepared, kernels.LinearWeight) and prepared.backend == "dot":
            assert (prepared.onednn is not None) == torch.backends.mkldnn.is_available()
        for shape in [(1, 64), (3, 2, 64), (50, 64), (5, 13, 64)]:
            x = torch.randn(*shape, generator=gen).to(dtype)
            got = kernels.linear(x, prepared, bias)
            assert got.dtype == dtype and got.shape == (*shape[:-1], features)
            torch.testing.assert_close(got.float(), F.linear(x.float(), w.float(), bias.float()), **TOL[dtype])
    half = torch.randn(4, 64, generator=gen).half()
    assert kernels.prepare_linear(w.half()) is not None
    torch.testing.assert_close(kernels.linear(half, kernels.prepare_linear(w.half())), F.linear(half, w.half()))


def test_no_compiler_logs_once_and_falls_back(monkeypatch, caplog):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with caplog.at_level(logging.WARNING, logger="expert_workers.kernels"):
        assert kernels.available_backends.__wrapped__() == ()
    assert [r.getMessage() for r in caplog.records] == [
        "moe-serve CPU kernels unavailable (no c++ or ninja on PATH); plain torch computes, more slowly"]


def test_plain_torch_path_gives_the_kernels_tokens(tiny_model):
    """MOE_SERVE_CPU_KERNELS=torch (what runs where no kernel builds): the same greedy tokens, and logits
    within fp32 rounding, as the default path in this process."""
    from router_service.engine import EngineSettings, load_engine
    from router_service.sampling import SamplingParams

    script = textwrap.dedent(f"""
        import json, torch
        from expert_workers import kernels
        from router_service.engine import EngineSettings, load_engine
        from router_service.sampling import SamplingParams
        assert kernels.available_backends() == ()
        eng = load_engine({tiny_model!r}, EngineSettings(max_model_len=64, max_num_seqs=4, dtype="float32"))
        done = eng.generate([[1, 5, 9, 200], [1, 7]], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True))
        print(json.dumps([[c.token_ids, c.logprobs] for c in done]))
    """)
    env = {**os.environ, kernels.ENV: "torch"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240, check=True)
    theirs = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    eng = load_engine(tiny_model, EngineSettings(max_model_len=64, max_num_seqs=4, dtype="float32"))
    ours = eng.generate([[1, 5, 9, 200], [1, 7]], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True))
    for (tokens, logprobs), c in zip(theirs, ours):
        assert tokens == c.token_ids
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(logprobs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Q,N", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_decode_attention_matches_sdpa(dtype, Q, N):
    """Each sequence's one query against the first lens[b] positions of its own slot (slots out of order,
    lengths from 1 to the whole cache), as SDPA computes it on the gathered keys and values."""
    if not kernels.attention_runs_here(dtype, torch.device("cpu")):
        pytest.skip("no kernels built here")
    S, M, D = 5, 12, 16
    gen = torch.Generator().manual_seed(Q)
    k, v = torch.randn(S, N, M, D, generator=gen).to(dtype), torch.randn(S, N, M, D, generator=gen).to(dtype)
    slots, lens = torch.tensor([3, 0, 4]), torch.tensor([1, 12, 7])
    q = torch.randn(3, Q, D, generator=gen).to(dtype)
    got = kernels.decode_attention(q, k, v, slots, lens, D ** -0.5)
    for b in range(3):
        keys, values = k[slots[b], :, : lens[b]].float(), v[slots[b], :, : lens[b]].float()  # [N, L, D]
        want = F.scaled_dot_product_attention(q[b, :, None].float(), keys.repeat_interleave(Q // N, 0),
                                              values.repeat_interleave(Q // N, 0))[:, 0]  # [Q, D]
        torch.testing.assert_close(got[b].float(), want, **TOL[dtype])
    with pytest.raises(RuntimeError, match="sequence 0 has slot 9"):
        kernels.decode_attention(q, k, v, torch.tensor([9, 0, 1]), lens, 1.0)


def test_avx2_build_matches_torch():
    """The kernels as an AVX2-only CPU (AMD without AVX-512, say) builds them: -march=haswell, run here in a
    subprocess. Only fma and dot:float32 exist there; linear, moe and decode attention must still match torch."""
    import platform
    import shutil

    if platform.machine() != "x86_64" or shutil.which("c++") is None or "dot:float32" not in HERE:
        pytest.skip("no x86-64 build here")
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from expert_workers import kernels
        assert kernels.available_backends() == ("fma", "dot:float32"), kernels.available_backends()
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(5, 40, generator=g), torch.randn(20, 40, generator=g)
        torch.testing.assert_close(torch.ops.moe_serve_cpu.linear(x, w, "dot"), F.linear(x, w), rtol=1e-5, atol=1e-5)
        for m, k in ((1, 40), (6, 40), (7, 40), (13, 300)):  # one row block, a full one, tails; K in 3 chunks
            x, w = torch.randn(m, k, generator=g), torch.randn(48, k, generator=g)
            got = torch.ops.moe_serve_cpu.linear(x, kernels.pack_panels(w), "fma")
            torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
        # fma packs panels of 16 features (H = 16); dot takes any shape (H = 24).
        for backend, H, I, pack in (("fma", 16, 16, kernels.pack_panels), ("dot", 24, 8, lambda t: t)):
            gate_up, down = torch.randn(3, 2 * I, H, generator=g), torch.randn(3, H, I, generator=g)
            h = torch.randn(4, H, generator=g)
            row, token, wt = torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 1, 3]), torch.rand(4, generator=g)
            want = torch.zeros(4, H)
            for r, t, c in zip(row.tolist(), token.tolist(), wt.tolist()):
                a, b = F.linear(h[t], gate_up[r]).chunk(2)
                want[t] += c * F.linear(F.silu(a) * b, down[r])
            got = kernels.moe(h, pack(gate_up), pack(down), backend, row, token, wt)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        q, k, v = torch.randn(2, 4, 16, generator=g), torch.randn(3, 2, 8, 16, generator=g), torch.randn(3, 2, 8, 16, generator=g)
        got = kernels.decode_attention(q, k, v, torch.tensor([2, 0]), torch.tensor([5, 8]), 0.25)
        ref = F.scaled_dot_product_attention(q[0, :, None], k[2, :, :5].repeat_interleave(2, 0),
                                             v[2, :, :5].repeat_interleave(2, 0), scale=0.25)[:, 0]
        torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    env = {**os.environ, kernels.MARCH_ENV: "haswell"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
