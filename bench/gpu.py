"""GPU: the PPO step's main costs with a Hugging Face-sized policy on one CUDA device.

Skipped (one row) when `torch.cuda.is_available()` is False. Otherwise, on a randomly initialized
GPT-2 medium-shaped model (24 layers, d 1024, 16 heads, vocabulary 50304: ~355M parameters; no
download), fed with the testbed's tokenizer and prompts (its token ids are all below 50304):

    matmul peak   best of bf16 and fp32 (TF32 off, torch's default) (n x n) @ (n x n) products,
                  2 n^3 FLOPs each, best of 5 timed batches of 10 (synchronized)
    generate      rlhf_overopt.rollout.generate on 64 prompts x 48 new tokens, bf16 weights;
                  tokens/s = sampled response tokens (B x Tr) / median seconds
    update        one PPO minibatch (16 rows) optimizer step of policy and value, as
                  rlhf_overopt.update.ppo_update computes it (sequence_logprobs + ppo_policy_loss, response_values +
                  ppo_value_loss, backward, AdamW), fp32 master weights under bf16 autocast, plain
                  torch.optim (no DeepSpeed: a CPU gloo group made by another section in this
                  process must not decide the GPU's backend)
                  MFU = update FLOPs (bench.ppo_step.update_flops, one epoch of one minibatch)
                        / seconds / bf16 matmul peak
    ensemble      proxy scoring of the rollout by a ProxyEnsemble of K = 1 and K = 5 untrained
                  GPT-2 medium reward models (bf16), the ratio K=5 / K=1
    checkpointing the update above with gradient checkpointing (Chen et al. 2016) on policy and
                  value backbone (`engines.enable_gradient_checkpointing`): step time and peak
                  allocated memory (models, optimizer states, activations) with and without
    lora          peak allocated memory of the update with a LoRA policy (Hu et al. 2021,
                  `engines.lora_policy`, r = LORA_R, all linear layers) against the full policy

All timings synchronize the device before reading the clock; medians over the context's repeats.
--quick shrinks the model to 4 x 256 and the batches to a few rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import BenchContext, Row, median_time

TITLE = "GPU"
SECTION = "gpu"
MFU_TARGET = 0.25
LORA_R = 16
"""LoRA rank of the GPU memory comparison."""


@dataclass(frozen=True)
class Sizes:
    """Model shape (GPT-2), batch sizes and the matmul-peak operand size of one GPU run."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    gen_batch: int
    new_tokens: int
    mini_batch: int
    peak_n: int


FULL = Sizes(n_layer=24, n_embd=1024, n_head=16, vocab=50304, gen_batch=64, new_tokens=48, mini_batch=16, peak_n=8192)
QUICK = Sizes(n_layer=4, n_embd=256, n_head=4, vocab=50304, gen_batch=8, new_tokens=8, mini_batch=4, peak_n=2048)


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """`fn` followed by a device synchronization, so wall time covers the queued kernels."""

    def call() -> Any:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return call


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """(median seconds after one warm-up, the last result)."""
    out: list[Any] = []
    seconds, _ = median_time(synced(lambda: out.append(fn()), device), repeats)
    return seconds, out[-1]


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10, trials: int = 5) -> float:
    """Best GFLOP/s of (n x n) @ (n x n) in `dtype`: `trials` timings of `reps` products, synchronized."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    run = synced(lambda: [torch.mm(a, b) for _ in range(reps)], device)
    run()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best / 1e9


def gpt2_config(s: Sizes, tokenizer):
    from transformers import GPT2Config

    return GPT2Config(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, vocab_size=s.vocab, n_positions=1024,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, num_labels=1)


def proxy_ensemble(config, tokenizer, k: int, device: torch.device):
    """K untrained reward models of the policy's shape (scoring cost does not depend on weights)."""
    from transformers import GPT2ForSequenceClassification

    from rlhf_overopt.rewards.ensemble import ProxyEnsemble
    from rlhf_overopt.rewards.members import SeparateMembers

    models = []
    for i in range(k):
        torch.manual_seed(i)
        models.append(GPT2ForSequenceClassification(config).to(device, torch.bfloat16).eval())
    return ProxyEnsemble(SeparateMembers("independent", [f"member_{i}" for i in range(k)], models), tokenizer,
                         max_length=config.n_positions, standardize=False)


def update_step(policy, value, optimizers, ro, old_logprobs, old_values, advantages, returns, cfg, device):
    """One minibatch optimizer step of policy and value, the computation of rlhf_overopt.update.ppo_update."""
    from rlhf_overopt.ops.losses import ppo_policy_loss, ppo_value_loss
    from rlhf_overopt.rollout import sequence_logprobs
    from rlhf_overopt.values import response_values

    p = cfg.ppo
    mask = ro.response_mask
    args = (ro.query_ids, ro.query_mask, ro.response_ids, mask)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        logprobs = sequence_logprobs(policy, *args, temperature=p.temperature)
        pg_loss, _ = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, p.clip_range)
    pg_loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), p.max_grad_norm)
    optimizers[0].step()
    optimizers[0].zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        values = response_values(value, *args)[0].float()
        vf_loss, _ = ppo_value_loss(values, old_values, returns, mask, p.clip_range_value)
    (p.vf_coef * vf_loss).backward()
    torch.nn.utils.clip_grad_norm_(value.parameters(), p.max_grad_norm)
    optimizers[1].step()
    optimizers[1].zero_grad(set_to_none=True)


def measure_generate(ctx: BenchContext, config, tokenizer, device: torch.device, s: Sizes) -> tuple[list[Row], Any]:
    """Sampling with bf16 weights: (rows, the rollout)."""
    from transformers import GPT2LMHeadModel

    from rlhf_overopt.rollout import generate

    torch.manual_seed(ctx.config.seed)
    policy = GPT2LMHeadModel(config).to(device, torch.bfloat16).eval()
    prompts = list(ctx.testbed.load_prompts()["train"]["prompt"])[: s.gen_batch]
    seconds, ro = timed(lambda: generate(policy, tokenizer, prompts, max_new_tokens=s.new_tokens,
                                         generator=torch.Generator(device=device).manual_seed(ctx.config.seed)),
                        device, ctx.repeats)
    n_params = sum(q.numel() for q in policy.parameters())
    rows = [Row(SECTION, "generate", seconds, "s", note=f"{len(prompts)} prompts x {ro.response_ids.shape[1]} tokens, "
                                                         f"{n_params / 1e6:.0f}M-parameter policy, bf16"),
            Row(SECTION, "generated tokens/s", ro.response_ids.numel() / seconds, "tok/s", note="B x Tr sampled")]
    return rows, ro


def measure_update(ctx: BenchContext, config, ro, device: torch.device, s: Sizes, peak: float) -> list[Row]:
    """One PPO minibatch optimizer step of policy and value; its MFU against `peak` (GFLOP/s)."""
    from transformers import GPT2LMHeadModel, GPT2Model

    from bench.ppo_step import update_flops
    from rlhf_overopt.values import ValueModel

    cfg = ctx.config
    torch.manual_seed(cfg.seed)
    policy = GPT2LMHeadModel(config).to(device).train()
    value = ValueModel(GPT2Model(config)).to(device).train()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=cfg.ppo.lr, eps=1e-5) for m in (policy, value)]
    mb = ro.select(list(range(min(s.mini_batch, len(ro)))))
    mask = mb.response_mask
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    old_logprobs = mb.logprobs.float()
    old_values = torch.zeros_like(old_logprobs)
    advantages = torch.randn(mask.shape, generator=generator, device=device) * mask
    returns = torch.randn(mask.shape, generator=generator, device=device) * mask
    seconds, _ = timed(lambda: update_step(policy, value, optimizers, mb, old_logprobs, old_values, advantages,
                                           returns, cfg, device), device, ctx.repeats)
    flops = update_flops(config, rows=len(mb), query_width=mb.query_ids.shape[1],
                         response_width=mb.response_ids.shape[1], epochs=1)
    mfu = flops / seconds / 1e9 / peak
    return [Row(SECTION, "update (one minibatch, policy + value)", seconds, "s",
                note=f"{len(mb)} rows x {mb.query_ids.shape[1] + mask.shape[1]} tokens, {flops / 1e12:.3f} TFLOP"),
            Row(SECTION, "update MFU", mfu, "", ratio=mfu, baseline="bf16 matmul peak",
                target=f">= {MFU_TARGET:.0%} of the matmul peak", met=mfu >= MFU_TARGET,
                note=f"{flops / seconds / 1e12:.1f} TFLOP/s")]


def peak_allocated(device: torch.device) -> int:
    """Peak bytes allocated on `device` since the last reset (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def update_variant(ctx: BenchContext, config, ro, device: torch.device, s: Sizes, *, checkpointing: bool = False,
                   lora_r: int = 0) -> tuple[float, int]:
    """(median seconds, peak allocated bytes) of one PPO minibatch update of fresh policy + value
    models, with gradient checkpointing and/or a LoRA policy. The peak covers the models, their
    optimizer states (allocated by the warm-up step) and the activations of the timed steps."""
    import dataclasses

    from transformers import GPT2LMHeadModel, GPT2Model

    from rlhf_overopt.run.engines import enable_gradient_checkpointing, lora_policy
    from rlhf_overopt.values import ValueModel

    cfg = ctx.config
    reset_peak(device)
    torch.manual_seed(cfg.seed)
    policy = GPT2LMHeadModel(config).to(device)
    value = ValueModel(GPT2Model(config)).to(device)
    if checkpointing:
        enable_gradient_checkpointing(policy)
        enable_gradient_checkpointing(value.backbone)
    if lora_r:
        policy = lora_policy(policy, dataclasses.replace(cfg.policy, lora_r=lora_r, lora_alpha=2 * lora_r))
    policy.train()
    value.train()
    optimizers = [torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=cfg.ppo.lr, eps=1e-5)
                  for m in (policy, value)]
    mb = ro.select(list(range(min(s.mini_batch, len(ro)))))
    mask = mb.response_mask
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    old_logprobs = mb.logprobs.float()
    old_values = torch.zeros_like(old_logprobs)
    advantages = torch.randn(mask.shape, generator=generator, device=device) * mask
    returns = torch.randn(mask.shape, generator=generator, device=device) * mask
    seconds, _ = timed(lambda: update_step(policy, value, optimizers, mb, old_logprobs, old_values, advantages,
                                           returns, cfg, device), device, ctx.repeats)
    return seconds, peak_allocated(device)  # the models are freed on return; the next variant resets the peak


def measure_checkpointing(ctx: BenchContext, config, ro, device: torch.device, s: Sizes) -> list[Row]:
    """The PPO minibatch update with and without gradient checkpointing: time and peak memory."""
    plain = update_variant(ctx, config, ro, device, s)
    ckpt = update_variant(ctx, config, ro, device, s, checkpointing=True)
    gib = 2**30
    return [Row(SECTION, "update peak memory", plain[1] / gib, "GiB", note="policy + value, AdamW, no checkpointing"),
            Row(SECTION, "update peak memory, gradient checkpointing", ckpt[1] / gib, "GiB",
                ratio=ckpt[1] / max(plain[1], 1), baseline="no checkpointing"),
            Row(SECTION, "update, gradient checkpointing", ckpt[0], "s", ratio=ckpt[0] / plain[0],
                baseline="no checkpointing", note=f"without: {plain[0]:.3f} s (one more forward per backward)")]


def measure_lora(ctx: BenchContext, config, ro, device: torch.device, s: Sizes) -> list[Row]:
    """Peak memory of the PPO minibatch update with a LoRA policy against the full policy."""
    full = update_variant(ctx, config, ro, device, s)
    lora = update_variant(ctx, config, ro, device, s, lora_r=LORA_R)
    gib = 2**30
    return [Row(SECTION, f"update peak memory, LoRA r={LORA_R} policy", lora[1] / gib, "GiB",
                ratio=lora[1] / max(full[1], 1), baseline="full policy",
                note=f"full: {full[1] / gib:.2f} GiB; value model full in both"),
            Row(SECTION, f"update, LoRA r={LORA_R} policy", lora[0], "s", ratio=lora[0] / full[0],
                baseline="full policy")]


def measure_ensemble(ctx: BenchContext, config, tokenizer, ro, device: torch.device) -> list[Row]:
    """Proxy scoring of the rollout by K = 1 and K = 5 members (K=1 is the K=5 ensemble's first member)."""
    from rlhf_overopt.evaluate import score_proxies
    from rlhf_overopt.ops.aggregate import aggregator
    from rlhf_overopt.rewards.ensemble import ProxyEnsemble
    from rlhf_overopt.rewards.members import SeparateMembers

    ensemble = proxy_ensemble(config, tokenizer, 5, device)
    single = ProxyEnsemble(SeparateMembers("independent", ["member_0"], ensemble.members.models[:1]), tokenizer,
                           max_length=ensemble.max_length, standardize=False)
    ended = ro.ended.tolist()
    times = {}
    with torch.no_grad():
        for k, ens in ((1, single), (5, ensemble)):
            agg = ctx.config.aggregate
            objective = aggregator(agg.name, uwo_lambda=agg.uwo_lambda, std_k=agg.std_k, variance=agg.variance)
            times[k], _ = timed(lambda e=ens: score_proxies(e, objective, ro.prompts, ro.responses, ended, 0),
                                device, ctx.repeats)
    return [Row(SECTION, "proxy scoring K=1", times[1], "s", note=f"{len(ro)} responses"),
            Row(SECTION, "proxy scoring K=5", times[5], "s", ratio=times[5] / times[1], baseline="K=1")]


def measure(ctx: BenchContext, device: torch.device, s: Sizes) -> tuple[list[Row], str]:
    """Every GPU figure on `device` (callable on the CPU with small sizes, to check the code)."""
    tokenizer = ctx.testbed.load_tokenizer()
    config = gpt2_config(s, tokenizer)
    # 1. matmul peaks
    peak_bf16 = matmul_peak(device, torch.bfloat16, s.peak_n)
    peak_fp32 = matmul_peak(device, torch.float32, s.peak_n)
    rows = [Row(SECTION, f"bf16 matmul peak ({s.peak_n}²)", peak_bf16, "GFLOP/s"),
            Row(SECTION, f"fp32 matmul peak ({s.peak_n}², TF32 off)", peak_fp32, "GFLOP/s")]
    # 2-4. generate, update, ensemble scoring (each frees its models on return)
    gen_rows, ro = measure_generate(ctx, config, tokenizer, device, s)
    rows += gen_rows
    rows += measure_update(ctx, config, ro, device, s, peak_bf16)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows += measure_ensemble(ctx, config, tokenizer, ro, device)
    if device.type == "cuda":  # 5-6. peak-memory figures: CUDA's allocator statistics only
        rows += measure_checkpointing(ctx, config, ro, device, s)
        rows += measure_lora(ctx, config, ro, device, s)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    notes = (f"Random-init GPT-2 ({s.n_layer} layers, d {s.n_embd}, {s.n_head} heads, vocabulary {s.vocab}) on "
             f"{where}, fed with the testbed tokenizer's prompts. Update FLOPs use the PPO step section's formula for "
             "one epoch over one minibatch; the update is plain torch AdamW (fp32 weights) under bf16 autocast, not a "
             "DeepSpeed engine. Proxy members are untrained reward models of the policy's shape in bf16.")
    return rows, notes


def run(ctx: BenchContext) -> list[Row]:
    if not torch.cuda.is_available():
        return [Row(SECTION, "GPU", 0.0, "", note="skipped: no CUDA device")]
    device = torch.device("cuda", torch.cuda.current_device())
    rows, notes = measure(ctx, device, QUICK if ctx.quick else FULL)
    ctx.extra[f"{SECTION}_notes"] = notes
    return rows
