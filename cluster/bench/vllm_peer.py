"""vLLM as a peer in `moe-serve bench engine --vllm PYTHON`: run by that interpreter, driven over stdin.

This file imports only the standard library, torch and vLLM (moe-serve is not installed in vLLM's venv).
It loads the checkpoint once and then answers one JSON request per stdin line with one JSON line on stdout:
    {"prompts": [[ids], ...], "tokens": N}   greedy, ignore_eos, exactly N tokens each -> {"seconds": s}
    {"peak_rss": true}                        -> {"bytes": largest resident set of vLLM's processes so far}
so the engine bench can alternate rounds between the two engines. Anything vLLM prints goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--max-num-seqs", type=int, required=True)
    p.add_argument("--max-batched-tokens", type=int, required=True)
    args = p.parse_args()
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's own prints must not interleave with replies
    from vllm import LLM, SamplingParams

    # Prefix caching off: the engine bench's 1-token run would otherwise skip the prefill it subtracts.
    llm = LLM(model=args.model, dtype=args.dtype, trust_remote_code=True, enforce_eager=True, seed=0,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_batched_tokens, enable_prefix_caching=False)
    import vllm

    reply.write(json.dumps({"ready": True, "vllm": vllm.__version__}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("peak_rss"):
            kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
            reply.write(json.dumps({"bytes": _tree_rss() or kib * 1024}) + "\n")
            continue
        n = request["tokens"]
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        reply.write(json.dumps({"seconds": seconds}) + "\n")
    return 0


def _tree_rss() -> int | None:
    """Peak resident bytes of the largest process among this one and its descendants (VmHWM), Linux only."""
    try:
        import psutil
    except ImportError:
        return None
    peak = 0
    for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            for line in open(f"/proc/{proc.pid}/status"):
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
    return peak or None


if __name__ == "__main__":
    sys.exit(main())
