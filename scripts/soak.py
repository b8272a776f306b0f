#!/usr/bin/env python3
"""Soak the engine: many requests through a tiny random Llama, then check that nothing leaked.

Requests share prefixes at several depths (a tree of prefixes, two namespaces), fork (n > 1,
seeded sampling), stop on token ids, are cancelled part-way, and run on two engines in turn:
one with a pool small enough to preempt, one with eviction and a host tier small enough to
spill to a file. Afterwards every pool, host tier and spill file is empty (cache.stats() after
clear()), RSS and open file descriptors are flat (after warm-up vs the end, with a tolerance),
and a sample of the outputs equals a fresh engine's run of the same requests one at a time.

    python scripts/soak.py --requests 10000 --seconds 1800     # the long form
    python scripts/soak.py --requests 300 --seconds 60         # what tests/test_soak.py runs

Exit status 0 when every check holds; otherwise each failed check is printed and it is 1.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

VOCAB = 256
C = 16


def tiny_llama():
    import torch
    import transformers

    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                   max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(cfg).eval()


def engines(model, spill_dir, tag):
    """The two engines of the soak; `tag` names their spill file (a spill file belongs to one
    cache at a time, so the fresh engines that check outputs get their own)."""
    import chunkvale
    from chunkvale.engine import Engine

    small = Engine(model, chunk_size=C, capacity_tokens=24 * C, max_batch_size=16, max_step_tokens=256, threads=1)
    ev = chunkvale.Eviction(budget_tokens=64, sink_chunks=1, window_chunks=1, topk_chunks=1, dense_layers=1,
                            device_chunks=14, host_bytes=16 * 4096, spill_path=os.path.join(spill_dir, f"spill-{tag}.bin"))
    tiered = Engine(model, chunk_size=C, capacity_tokens=256 * C, max_batch_size=16, max_step_tokens=256,
                    threads=1, eviction=ev)
    return {"small-pool": small, "host-tier": tiered}


class Workload:
    """Random requests over a prefix tree: 4 roots of 20-40 tokens, each with 3 children of
    5-30 tokens, each with 2 grandchildren; a request takes a path to some depth (0-3), cut at a
    random point of its last piece, plus 0-12 tokens of its own."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        r = self.rng
        piece = lambda lo, hi: [r.randrange(VOCAB) for _ in range(r.randint(lo, hi))]  # noqa: E731
        self.tree = [(piece(20, 40), [(piece(5, 30), [piece(5, 30) for _ in range(2)]) for _ in range(3)])
                     for _ in range(4)]

    def request(self, i):
        from chunkvale.engine import Request

        r = self.rng
        root, children = r.choice(self.tree)
        path = [root]
        depth = r.randint(0, 3)
        if depth >= 2:
            child, grand = r.choice(children)
            path.append(child)
            if depth == 3:
                path.append(r.choice(grand))
        prompt = [t for p in path[:-1] for t in p] + path[-1][: r.randint(1, len(path[-1]))]
        prompt += [r.randrange(VOCAB) for _ in range(r.randint(0 if depth else 1, 12))]
        n = r.choice([1, 1, 1, 2, 3])
        sampled = n > 1 or r.random() < 0.3
        return Request(token_ids=prompt, max_new_tokens=r.randint(1, 24), n=n,
                       temperature=0.8 if sampled else 0.0, top_p=r.choice([1.0, 0.9]), seed=i,
                       stop=[r.randrange(VOCAB)] if r.random() < 0.3 else None,
                       namespace=r.choice(["", "", "tenant-b"]), id=i)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def check_result(res, problems, was_cancelled=False):
    req = res.request
    for s in res.samples:
        if s.finish_reason == "cancelled":
            continue
        if len(s.token_ids) > req.max_new_tokens or s.finish_reason not in ("stop", "length"):
            problems.append(f"request {req.id}: {s.finish_reason} after {len(s.token_ids)} tokens "
                            f"(max_new_tokens {req.max_new_tokens}, error {res.error})")
        if s.finish_reason == "stop" and (not req.stop or s.token_ids[-1] not in req.stop):
            problems.append(f"request {req.id}: stopped on {s.token_ids[-1:]} but its stop ids are {req.stop}")
    if res.error is not None:
        problems.append(f"request {req.id}: failed: {res.error}")
    elif not was_cancelled and len(res.samples) != req.n:
        problems.append(f"request {req.id}: {len(res.samples)} samples, n={req.n}")


def soak(requests: int, seconds: float, seed: int = 0, sample_every: int = 25, log=print) -> list[str]:
    import torch

    # One torch thread: the tiny model gains nothing from more, and torch's OpenMP workers
    # spinning between ops would take the cores chunkvale's attention needs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _soak(requests, seconds, seed, sample_every, log)
    finally:
        torch.set_num_threads(threads)


def _soak(requests, seconds, seed, sample_every, log):
    model = tiny_llama()
    problems: list[str] = []
    work = Workload(seed)
    rng = random.Random(seed + 1)
    with tempfile.TemporaryDirectory(prefix="chunkvale-soak-") as spill_dir:
        engs = engines(model, spill_dir, "soak")
        names = list(engs)
        done = cancelled = preemptions = peak_spill = evictions = 0
        sample = []  # (engine name, request, samples)
        start = time.monotonic()
        warm = None
        i = 0
        rounds = 0
        while i < requests and time.monotonic() - start < seconds:
            name = names[rounds % len(names)]
            eng = engs[name]
            batch = [work.request(i + k) for k in range(min(rng.randint(8, 40), requests - i))]
            i += len(batch)
            rounds += 1
            indices = [eng.submit(req) for req in batch]
            to_cancel = {index for index in indices if rng.random() < 0.08}
            cancel_at = rng.randint(1, 6)
            steps = 0
            while eng.has_work():
                finished = eng.step()
                steps += 1
                if eng.eviction is not None:
                    st = eng.cache.stats()
                    peak_spill = max(peak_spill, st["evict_spill_bytes_in_use"])
                    evictions = st["evict_evictions"]
                stopped = []
                if steps == cancel_at:
                    stopped = [res for res in map(eng.cancel, sorted(to_cancel)) if res is not None]
                    cancelled += len(stopped)
                for res in stopped:
                    check_result(res, problems, was_cancelled=True)
                for res in finished:
                    check_result(res, problems)
                    if res.request.id % sample_every == 0:
                        sample.append((name, res.request, [s.token_ids for s in res.samples]))
                done += len(finished) + len(stopped)
            preemptions += eng.metrics().preemptions
            eng.reset_metrics()
            if warm is None and i >= requests // 5:
                warm = (rss_bytes(), open_fds())
            if rounds % 20 == 0:
                log(f"soak: {i} requests, {cancelled} cancelled, {preemptions} preemptions, "
                    f"{time.monotonic() - start:.0f} s, RSS {rss_bytes() / 2**20:.0f} MiB, {open_fds()} fds")
        # The soak exercised what it is for.
        if not (preemptions and cancelled and evictions and peak_spill):
            problems.append(f"not exercised: {preemptions} preemptions, {cancelled} cancellations, "
                            f"{evictions} host-tier evictions, spill file peak {peak_spill} B")
        if done != i:
            problems.append(f"{i} requests submitted but {done} results came back")
        for name, eng in engs.items():
            eng.cache.clear()
            st = eng.cache.stats()
            held = {k: st[k] for k in ("sequences", "chunks_in_use", "tokens_cached", "evict_device_slots_in_use",
                                       "evict_host_bytes_in_use", "evict_spill_bytes_in_use") if st.get(k)}
            if held:
                problems.append(f"{name}: not empty after clear(): {held}")
        if warm is None:
            warm = (rss_bytes(), open_fds())
        end = (rss_bytes(), open_fds())
        # Tolerances: allocator high-water marks and torch's caches settle after warm-up; a leak
        # of one chunk or one fd per request would be far past these.
        if end[0] - warm[0] > max(64 * 2**20, 0.25 * warm[0]):
            problems.append(f"RSS grew from {warm[0] / 2**20:.0f} MiB after warm-up to {end[0] / 2**20:.0f} MiB")
        if end[1] > warm[1] + 2:
            problems.append(f"open file descriptors grew from {warm[1]} after warm-up to {end[1]}")
        # A fresh engine of the same kind, one request at a time, gives the same tokens.
        fresh = engines(model, spill_dir, "fresh")
        for name, req, want in sample:
            res = fresh[name].generate([req], progress=False)[0]
            if [s.token_ids for s in res.samples] != want:
                problems.append(f"{name}: request {req.id} gave {want} in the soak, "
                                f"{[s.token_ids for s in res.samples]} alone on a fresh engine")
        fresh = engs = eng = None  # the last caches go (each removes its own spill file)
        gc.collect()
        log(f"soak: {i} requests ({cancelled} cancelled, {preemptions} preemptions, {evictions} host-tier "
            f"evictions, spill file peak {peak_spill} B) in "
            f"{time.monotonic() - start:.0f} s; RSS {warm[0] / 2**20:.0f} -> {end[0] / 2**20:.0f} MiB, "
            f"fds {warm[1]} -> {end[1]}; {len(sample)} outputs compared with a fresh run; "
            f"{len(problems)} problems")
        leftovers = os.listdir(spill_dir)
    if leftovers:
        problems.append(f"spill directory not empty after the caches went: {leftovers}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10000, help="requests to submit (default 10000)")
    p.add_argument("--seconds", type=float, default=3600, help="stop submitting after this long (default 3600)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.requests < 1 or args.seconds <= 0:
        p.error("--requests and --seconds must be positive")
    problems = soak(args.requests, args.seconds, args.seed)
    for line in problems[:50]:
        print("soak: FAIL:", line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
