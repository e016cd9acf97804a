"""PPO step breakdown: where one iteration of the main job's PPO loop spends its time, and how
well the update phase uses the CPU's matmul throughput.

Everything runs through the framework's own functions, at the main job's sizes (`ppo.batch_size`
rollouts, `ppo.mini_batch_size` per optimizer step, `ppo.ppo_epochs`, `ppo.max_new_tokens`), on the
testbed policy, with the same engines the PPO driver builds (1-rank DeepSpeed
engines at `deepspeed.zero_stage`, AdamW, cosine schedule). Phases, in loop order:

    generate     rlhf_overopt.rollout.generate, one batch, KV cache, seeded sampler
    old logp     sequence_logprobs(policy engine), no grad
    ref logp     sequence_logprobs(frozen reference), no grad
    values       response_values(value engine), no grad
    proxy        rlhf_overopt.evaluate.score_proxies: K members + aggregation (the cached trained ensemble, or
                 untrained members of the same architecture when it is not cached)
    advantages   per-token KL penalty, score at the last token, GAE, whitening
    update       rlhf_overopt.update.ppo_update: ppo_epochs x (batch / minibatch) optimizer steps of policy
                 and value
    gold eval    rlhf_overopt.evaluate.evaluate_policy on eval.n_prompts held-out prompts (run every eval.every
                 steps, so its amortized share of a step is time / eval.every)

Each phase's figure is the median wall time over the timed repeats; its share is its median over
the sum of the medians of the training-step phases (generate .. update).

Model FLOPs of the update (2 FLOPs per multiply-add, backward = 2 x forward, so x3), per
rollout row and epoch, with W = Tq + Tr the padded width every minibatch keeps, d = n_embd,
L = n_layer, f = MLP inner size, V = vocabulary:

    dense  = 2 * W * L * (4 d^2 + 2 d f)                 (qkv, attention out, MLP)
    attn   = 2 * W * L * 2 * W * d                       (QK^T and AV, full W x W)
    policy = 3 * (dense + attn + 2 * (Tr + 1) * d * V)   (LM head on the Tr + 1 kept positions)
    value  = 3 * (dense + attn + 2 * W * d)              (scalar value head)
    update FLOPs = ppo_epochs * batch_size * (policy + value)
    MFU = update FLOPs / update seconds / fp32 matmul peak

Padded positions are counted: the hardware computes them. The peak is the run's (measured at
its start); because the machine is shared, a second figure divides by a peak measured again right
after the update. When the MFU target is missed, the
section adds the efficiency of single matmuls at the update's actual shapes and a torch.profiler
table of one update's top operators by self CPU time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import BenchContext, Row, matmul_peak_gflops, median_time

TITLE = "PPO step breakdown"
SECTION = "ppo_step"
MFU_TARGET = 0.25
STEP_PHASES = ("generate", "old log-probs", "reference log-probs", "values", "proxy scoring", "advantages",
               "update")


# -- setup -----------------------------------------------------------------------------------------


def bench_config(ctx: BenchContext):
    """The main job's config; with --quick, at most two minibatches, one epoch and 32 eval prompts."""
    cfg = ctx.config
    if not ctx.quick:
        return cfg
    p = cfg.ppo
    ppo = dataclasses.replace(p, batch_size=min(p.batch_size, 2 * p.mini_batch_size), ppo_epochs=1)
    ev = dataclasses.replace(cfg.eval, n_prompts=min(cfg.eval.n_prompts, 32))
    return dataclasses.replace(cfg, ppo=ppo, eval=ev)


def proxy_ensemble(cfg, testbed, tokenizer) -> tuple[Any, str]:
    """The main job's cached ensemble, or untrained members of the same architecture (timing only).

    Training the ensemble here would cost minutes; scoring cost depends on the architecture, not
    on the weights, so an untrained stand-in gives the same time (its scores are meaningless).
    """
    from rlhf_overopt.rewards.cache import ensemble_dir
    from rlhf_overopt.rewards.ensemble import ProxyEnsemble
    from rlhf_overopt.rewards.members import SeparateMembers
    from rlhf_overopt.run.models import context_length, reward_model_from_pretrained

    root = ensemble_dir(cfg, testbed)
    if (root / "ensemble.json").exists():
        ensemble = ProxyEnsemble.load(root, score_batch_size=cfg.proxy.score_batch_size)
        return ensemble.eval(), f"the main job's cached ensemble `{root.name}`"
    if cfg.proxy.kind not in ("independent", "pretrain"):
        return None, f"no cached {cfg.proxy.kind} ensemble at `{root}`; proxy scoring not measured"
    models = [reward_model_from_pretrained(testbed.policy_dir, pad_token_id=tokenizer.pad_token_id,
                                           seed=cfg.seed + i, n_layer=cfg.proxy.n_layer)
              for i in range(cfg.proxy.k)]
    max_length = cfg.proxy.max_length or context_length(models[0].config) or 1024
    ensemble = ProxyEnsemble(SeparateMembers("independent", [f"member_{i}" for i in range(cfg.proxy.k)], models),
                             tokenizer, max_length=max_length, score_batch_size=cfg.proxy.score_batch_size,
                             standardize=False, score_method=cfg.proxy.score_method)
    return ensemble.eval(), (f"no cached ensemble at `{root.name}`: {cfg.proxy.k} untrained members of the same "
                             "architecture stand in (same cost, meaningless scores)")


@dataclass
class Models:
    """What one PPO iteration touches, built as the PPO driver builds it (1 rank)."""

    policy_engine: Any
    value_engine: Any
    reference: torch.nn.Module
    ensemble: Any
    ensemble_note: str
    gold: Any
    tokenizer: Any


def build_models(cfg, testbed) -> Models:
    from rlhf_overopt.rewards.gold import GoldScorer
    from rlhf_overopt.run.engines import ds_config, ensure_process_group, frozen_model, train_engine
    from rlhf_overopt.values import ValueModel

    p = cfg.ppo
    ensure_process_group(torch.device("cpu"))
    tokenizer = testbed.load_tokenizer()
    ensemble, note = proxy_ensemble(cfg, testbed, tokenizer)
    engine_cfg = ds_config(zero_stage=cfg.deepspeed.zero_stage, micro_batch_per_rank=p.mini_batch_size, world_size=1,
                           max_grad_norm=p.max_grad_norm, extra_path=cfg.deepspeed.config, dtype=cfg.policy.dtype)
    total_steps = p.steps * p.ppo_epochs * (p.batch_size // p.mini_batch_size)
    torch.manual_seed(cfg.seed)  # the value head's initialization
    policy_engine = train_engine(testbed.load_policy(), lr=p.lr, total_steps=total_steps,
                                 final_ratio=p.lr_final_ratio, config=engine_cfg)
    # value_init=policy (the main job's); a proxy backbone has the same architecture and cost
    value_engine = train_engine(ValueModel.from_pretrained_backbone(str(testbed.policy_dir)), lr=p.value_lr,
                                total_steps=total_steps, final_ratio=p.lr_final_ratio, config=engine_cfg)
    reference = frozen_model(testbed.load_policy(), zero_stage=cfg.deepspeed.zero_stage, config=engine_cfg,
                             device=torch.device("cpu"))
    return Models(policy_engine, value_engine, reference, ensemble, note, GoldScorer.from_config(cfg, testbed),
                  tokenizer)


# -- timing ----------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(median seconds over `repeats` after one warm-up, the last call's result)."""
    out: list[Any] = []
    seconds, _ = median_time(lambda: out.append(fn()), repeats)
    return seconds, out[-1]


def measure_phases(cfg, models: Models, testbed, repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of every phase, and the rollout facts the FLOP count needs."""
    from rlhf_overopt.evaluate import evaluate_policy, score_proxies
    from rlhf_overopt.ops.advantages import gae, token_rewards
    from rlhf_overopt.ops.aggregate import aggregator
    from rlhf_overopt.ops.kl import kl_penalty_per_token
    from rlhf_overopt.rollout import generate, sequence_logprobs
    from rlhf_overopt.run.dist import global_whiten
    from rlhf_overopt.run.seeds import eval_generator, step_generator
    from rlhf_overopt.update import ppo_update
    from rlhf_overopt.values import response_values

    p = cfg.ppo
    m = models
    policy = m.policy_engine.module
    prompts = testbed.load_prompts()
    train_prompts = list(prompts["train"]["prompt"])
    eval_prompts = list(prompts["eval"]["prompt"])[: cfg.eval.n_prompts]
    draw = torch.randperm(len(train_prompts), generator=step_generator(cfg.seed, 0))[: p.batch_size]
    batch_prompts = [train_prompts[int(i)] for i in draw]
    t: dict[str, float] = {}
    agg = cfg.aggregate
    objective = aggregator(agg.name, uwo_lambda=agg.uwo_lambda, std_k=agg.std_k, variance=agg.variance)

    # 1. rollout (the same seed every repeat, so every repeat samples the same tokens)
    t["generate"], ro = timed(lambda: generate(policy, m.tokenizer, batch_prompts, max_new_tokens=p.max_new_tokens,
                                               temperature=p.temperature,
                                               generator=torch.Generator().manual_seed(cfg.seed)), repeats)
    mask = ro.response_mask
    args = (ro.query_ids, ro.query_mask, ro.response_ids, mask)
    # 2. log-probs and values, without gradients as in the loop
    with torch.no_grad():
        t["old log-probs"], old_logprobs = timed(
            lambda: sequence_logprobs(m.policy_engine, *args, temperature=p.temperature), repeats)
        t["reference log-probs"], ref_logprobs = timed(
            lambda: sequence_logprobs(m.reference, *args, temperature=p.temperature), repeats)
        t["values"], old_values = timed(lambda: response_values(m.value_engine, *args), repeats)
        # 3. proxy scores (K, B) -> aggregate (B,)
        ended = ro.ended.tolist()
        if m.ensemble is not None:
            t["proxy scoring"], (_, score) = timed(
                lambda: score_proxies(m.ensemble, objective, ro.prompts, ro.responses, ended, 0), repeats)
        else:
            score = torch.zeros(len(ro))

        # 4. rewards and advantages (the PPO driver's steps 5-6)
        def advantages() -> tuple[torch.Tensor, torch.Tensor]:
            kl_tokens = kl_penalty_per_token(old_logprobs, ref_logprobs, p.kl_penalty_estimator) * mask
            rewards = token_rewards(score, kl_tokens, p.kl_coef, mask)
            adv, ret = gae(rewards, old_values[0], mask, p.gamma, p.lam)
            return (global_whiten(adv, mask) if p.whiten_advantages else adv), ret

        t["advantages"], (adv, returns) = timed(advantages, repeats)
    # 5. the update (each repeat takes real optimizer steps; shapes and cost do not change)
    def update() -> dict[str, float]:
        return ppo_update(m.policy_engine, m.value_engine, ro, old_logprobs=old_logprobs, old_values=old_values,
                          returns=returns[None], advantages_for=lambda idx: adv[idx], epochs=p.ppo_epochs,
                          micro_batch=p.mini_batch_size, clip_range=p.clip_range, clip_range_value=p.clip_range_value,
                          vf_coef=p.vf_coef, temperature=p.temperature, generator=step_generator(cfg.seed, 0, 1),
                          step=0)

    t["update"], _ = timed(update, repeats)
    # 6. gold evaluation as the loop runs it (fewer repeats: it is the longest phase)
    if m.ensemble is not None:
        t["gold eval"], _ = timed(lambda: evaluate_policy(
            policy=policy, reference=m.reference, tokenizer=m.tokenizer, prompts=eval_prompts, gold=m.gold, ev=cfg.eval,
            zero_stage=cfg.deepspeed.zero_stage, generator=eval_generator(cfg.seed, 0, torch.device("cpu")),
            method="ppo", step=0, aggregator=agg.name, ensemble=m.ensemble, aggregate_fn=objective),
            max(1, repeats // 2))
    facts = {"rows": len(ro), "query_width": ro.query_ids.shape[1], "response_width": ro.response_ids.shape[1],
             "response_tokens": int(mask.sum()), "update": update}
    return t, facts


# -- FLOPs and the profile -------------------------------------------------------------------------


def update_flops(model_config, *, rows: int, query_width: int, response_width: int, epochs: int) -> float:
    """Model FLOPs of `epochs` forward+backward passes of policy and value over `rows` rollouts
    (the formula of the module docstring)."""
    d, layers, vocab = model_config.n_embd, model_config.n_layer, model_config.vocab_size
    inner = model_config.n_inner or 4 * d
    width = query_width + response_width
    dense = 2 * width * layers * (4 * d * d + 2 * d * inner)
    attn = 2 * width * layers * 2 * width * d
    policy = 3 * (dense + attn + 2 * (response_width + 1) * d * vocab)
    value = 3 * (dense + attn + 2 * width * d)
    return float(epochs * rows * (policy + value))


def matmul_gflops(m: int, k: int, n: int, repeats: int) -> float:
    """Best GFLOP/s of bias + (m x k) @ (k x n), the addmm GPT-2's Conv1D layers run."""
    a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
    reps = max(1, int(2e8 // (2 * m * k * n)))  # ~0.2 GFLOP per timing, enough above the timer's noise
    best = float("inf")
    torch.addmm(bias, a, b)
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(reps):
            torch.addmm(bias, a, b)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * m * k * n / best / 1e9


def update_shapes(model_config, *, mini_batch: int, query_width: int, response_width: int) -> dict[str, tuple]:
    """The forward matmuls of one minibatch, as (label, m, k, n)."""
    d, vocab = model_config.n_embd, model_config.vocab_size
    inner = model_config.n_inner or 4 * d
    tokens = mini_batch * (query_width + response_width)
    kept = mini_batch * (response_width + 1)
    return {"qkv": (tokens, d, 3 * d), "mlp up": (tokens, d, inner), "mlp down": (tokens, inner, d),
            "lm head": (kept, d, vocab)}


def profile_update(update: Callable[[], Any], n: int = 3, top: int = 10) -> dict[str, Any]:
    """torch.profiler of `n` updates (several, so a pause by another process on this shared machine
    weighs less): a markdown table of the top ops by self CPU time, the matmul share of the ops' self
    CPU time, the ops' share of the wall time, and the operator calls per update."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(n):
            update()
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if "::" in e.key]  # operators (aten::, c10d::), not annotations
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    calls = sum(e.count for e in events) // n
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::addmm", "aten::mm", "aten::bmm",
                                                                     "aten::baddbmm", "aten::matmul"))
    lines = ["| op | calls per update | self CPU ms per update | share of op time |", "|---|---:|---:|---:|"]
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        lines.append(f"| `{e.key}` | {e.count // n} | {e.self_cpu_time_total / 1e3 / n:.1f} | "
                     f"{e.self_cpu_time_total / total:.0%} |")
    return {"table": "\n".join(lines), "matmul_share": matmul / total, "calls": calls,
            "op_share_of_wall": total / 1e6 / wall, "wall": wall / n}


# -- the section -----------------------------------------------------------------------------------


def run(ctx: BenchContext) -> list[Row]:
    torch.set_num_threads(ctx.threads)
    cfg = bench_config(ctx)
    p = cfg.ppo
    torch.manual_seed(cfg.seed)
    models = build_models(cfg, ctx.testbed)
    t, facts = measure_phases(cfg, models, ctx.testbed, ctx.repeats)
    step = sum(t.get(name, 0.0) for name in STEP_PHASES)

    rows = [Row(SECTION, name, t[name], "s", ratio=t[name] / step, baseline="share of the PPO step")
            for name in STEP_PHASES if name in t]
    rows.append(Row(SECTION, "PPO step (sum of phases)", step, "s",
                    note=f"B={p.batch_size}, minibatch {p.mini_batch_size}, {p.ppo_epochs} epochs, "
                         f"{p.max_new_tokens} new tokens"))
    if t.get("gold eval"):
        rows.append(Row(SECTION, "gold eval", t["gold eval"], "s", ratio=t["gold eval"] / step,
                        baseline="PPO step", note=f"{cfg.eval.n_prompts} prompts, every {cfg.eval.every} steps: "
                                                  f"{t['gold eval'] / cfg.eval.every / step:.0%} of a step amortized"))
    tokens = facts["response_tokens"]
    rows.append(Row(SECTION, "generated tokens/s", tokens / t["generate"], "tok/s",
                    note=f"{tokens} valid response tokens of {facts['rows']} x {facts['response_width']} sampled"))

    model_config = models.policy_engine.module.config
    flops = update_flops(model_config, rows=facts["rows"], query_width=facts["query_width"],
                         response_width=facts["response_width"], epochs=p.ppo_epochs)
    achieved = flops / t["update"] / 1e9
    mfu = achieved / ctx.peak_gflops
    rows.append(Row(SECTION, "update GFLOP/s", achieved, "GFLOP/s", note=f"{flops / 1e9:.2f} GFLOP per update"))
    rows.append(Row(SECTION, "update MFU", mfu, "", ratio=mfu, baseline="fp32 matmul peak",
                    target=f">= {MFU_TARGET:.0%} of the matmul peak", met=mfu >= MFU_TARGET))
    # The machine is shared: the peak is measured again here, beside the update, to show how much
    # of the MFU figure is the load of the moment rather than the code.
    local_peak = matmul_peak_gflops(ctx.threads, size=512 if ctx.quick else 1024)
    rows.append(Row(SECTION, "update MFU vs a peak measured beside it", achieved / local_peak, "",
                    ratio=achieved / local_peak, baseline=f"fp32 matmul peak now ({local_peak:.1f} GFLOP/s)",
                    note="same update time; the run's peak can be taken under another load"))

    n_policy = sum(q.numel() for q in models.policy_engine.module.parameters())
    n_value = sum(q.numel() for q in models.value_engine.module.parameters())
    width = facts["query_width"] + facts["response_width"]
    six_n = 6 * (n_policy + n_value) * p.ppo_epochs * facts["rows"] * width
    sizes = (f"Sizes: batch {p.batch_size}, minibatch {p.mini_batch_size}, {p.ppo_epochs} PPO epoch(s) "
             f"({p.ppo_epochs * p.batch_size // p.mini_batch_size} optimizer steps of each engine per update), "
             f"query width {facts['query_width']}, response width {facts['response_width']} (padded width {width}), "
             f"eval {cfg.eval.n_prompts} prompts. Proxy: {models.ensemble_note}. Engines: 1-rank DeepSpeed ZeRO-"
             f"{cfg.deepspeed.zero_stage} on CPU, {ctx.threads} torch thread(s). Policy {n_policy:,} parameters, "
             f"value model {n_value:,}.")
    formula = ("Update FLOPs = ppo_epochs x batch x (policy + value), each 3 x forward with forward = "
               "2·W·L·(4d² + 2d·f) dense + 2·W·L·2·W·d attention (+ 2·(Tr+1)·d·V for the policy's LM head on "
               "the kept positions, + 2·W·d for the value head), W = padded query + response width; padded "
               f"positions count. This gives {flops / 1e9:.2f} GFLOP; the 6 × params × tokens rule "
               f"(which counts the embedding table as a matmul on every position) gives {six_n / 1e9:.2f} GFLOP. "
               f"MFU = {achieved:.2f} GFLOP/s / {ctx.peak_gflops:.1f} GFLOP/s peak = {mfu:.1%}.")
    notes = [sizes, "", formula]
    if mfu < MFU_TARGET:
        rows += why_missed(ctx, model_config, facts, p.mini_batch_size, notes)
    ctx.extra[f"{SECTION}_notes"] = "\n".join(notes)
    return rows


def why_missed(ctx: BenchContext, model_config, facts: dict[str, Any], mini_batch: int, notes: list[str]) -> list[Row]:
    """Matmul efficiency at the update's own shapes, and a profile of a few updates."""
    rows = []
    shapes = update_shapes(model_config, mini_batch=mini_batch, query_width=facts["query_width"],
                           response_width=facts["response_width"])
    for label, (m, k, n) in shapes.items():
        gf = matmul_gflops(m, k, n, repeats=max(2, ctx.repeats))
        rows.append(Row(SECTION, f"matmul {label} ({m}x{k})@({k}x{n})", gf, "GFLOP/s", ratio=gf / ctx.peak_gflops,
                        baseline="fp32 matmul peak"))
    prof = profile_update(facts["update"])
    low, high = min(r.ratio for r in rows), max(r.ratio for r in rows)
    shapes_verdict = ("not the matmul shapes" if low >= 0.5 else "partly the matmul shapes")
    why = (f"Why the target is missed: {shapes_verdict} — single matmuls at the update's own shapes run at "
           f"{low:.0%}–{high:.0%} of the run's peak (rows above). Around them: profiling 3 updates "
           f"({prof['wall']:.3f} s each with the profiler on), the {prof['calls']:,} operator calls per update "
           f"account for {prof['op_share_of_wall']:.0%} of the wall time — the rest is Python and dispatch outside "
           f"any operator (transformers modules, the losses, DeepSpeed's engine, AdamW's per-parameter loop) — "
           f"and matmul kernels (addmm/mm/bmm) hold {prof['matmul_share']:.0%} of the operators' self CPU time. "
           f"Top operators by self CPU time:")
    notes += ["", why, "", prof["table"]]
    return rows
