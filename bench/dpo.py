"""DPO vs TRL: wall time of one DPO training epoch, ours against TRL's `DPOTrainer`.

Same model (the testbed SFT policy, fp32, dropout off), same data (the first M preference pairs
of the testbed, M a multiple of the batch size; every response ends with EOS, as TRL's standard
preference format has it), the DPO job's settings (configs/dpo.yaml: batch size, beta, lr,
gradient clipping), the same token cap (the policy's context length; no pair reaches it), sigmoid
DPO loss, AdamW with eps 1e-5, no weight decay and a constant LR on both sides (TRL keeps its
default fused AdamW implementation), CPU, `ctx.threads` torch threads. Both see the same batches
in the same order: TRL gets the pairs in our epoch's order (`rlhf_overopt.run.seeds.batch_indices`) and samples
them sequentially. TRL's DPOConfig turns activation checkpointing on by default (every forward is
recomputed in the backward); ours does not checkpoint, so the targeted comparison turns it off,
and one row times TRL as it comes.

    ours  one pass of loops/dpo.py's steps 4-7 over the epoch (batch, policy log-probs, reference
          log-probs precomputed or from the frozen reference, preference_loss, check_finite,
          DeepSpeed engine backward + step, the step statistics and train_stats.jsonl line), through
          its own functions; evaluation and checkpoints are left out
    TRL   trainer.train() for one epoch, logging, evaluation and saving off

    ratio = t(ours) / t(TRL), with and without precomputed reference log-probs (ours:
            dpo.precompute_ref, computed in the loop's step 3 before training; TRL:
            precompute_ref_log_probs, computed in DPOTrainer.__init__): in both the precompute
            happens before the timed epoch.

Repeats are interleaved (ours, TRL, ours, TRL, ...); every repeat trains one more epoch of the
same models (time does not depend on the weights). The first epoch of each is the correctness
check. Its first-step loss is log 2 on both sides by construction (policy == reference), so the
stronger checks are the epoch-mean loss and the weights after the epoch: with identical batches
and optimizer settings the two runs follow the same trajectory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import BenchContext, Row

TITLE = "DPO vs TRL"
SECTION = "dpo"
EPOCH_TARGET = 1.0
"""Our epoch should take at most this many TRL epochs."""
LOSS_TOLERANCE = 1e-4
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What engines.ensure_process_group (ours, or an earlier section's) puts in the environment."""


# -- data ------------------------------------------------------------------------------------------


@dataclass
class Data:
    columns: dict[str, list[str]]
    """prompt / chosen / rejected of the M pairs, in dataset order."""
    pairs: Any
    """rlhf_overopt.data.preferences.TokenizedPairs of the same pairs (EOS after every response)."""
    order: list[int]
    """Our epoch's pair order: the concatenated batches of rlhf_overopt.run.seeds.batch_indices."""
    max_length: int
    steps: int


def load_data(ctx: BenchContext, d, tokenizer, max_length: int) -> Data:
    from rlhf_overopt.data.preferences import tokenize_pairs
    from rlhf_overopt.run.seeds import batch_indices

    prefs = ctx.testbed.load_prefs()
    wanted = 64 if ctx.quick else 512
    n = min(wanted, len(prefs)) // d.batch_size * d.batch_size
    rows = prefs.select(range(n))
    columns = {c: list(rows[c]) for c in ("prompt", "chosen", "rejected")}
    ended = [True] * n  # TRL appends EOS to every response
    pairs = tokenize_pairs(tokenizer, columns["prompt"], columns["chosen"], columns["rejected"], ended, ended,
                           max_length)
    steps = n // d.batch_size
    order = torch.cat([batch_indices(s, steps, d.batch_size, n, ctx.config.seed, 0, 1) for s in range(steps)])
    return Data(columns, pairs, order.tolist(), max_length, steps)


# -- ours ------------------------------------------------------------------------------------------


@dataclass
class Ours:
    engine: Any
    reference: torch.nn.Module
    ref_logps: torch.Tensor | None
    stats_path: Path


def build_ours(ctx: BenchContext, d, data: Data, tokenizer, precompute: bool, tag: str) -> tuple[Ours, float]:
    """Step 3 of loops/dpo.py: policy engine, frozen reference and (optionally) the reference
    log-probs of every pair. Returns the pieces and the precompute time."""
    from rlhf_overopt.data.preferences import collate_pairs
    from rlhf_overopt.run.dist import sharded_map
    from rlhf_overopt.run.engines import ds_config, frozen_model, train_engine
    from rlhf_overopt.update import pair_logprobs

    cfg = ctx.config
    engine_cfg = ds_config(zero_stage=cfg.deepspeed.zero_stage, micro_batch_per_rank=d.batch_size, world_size=1,
                           max_grad_norm=d.max_grad_norm, extra_path=cfg.deepspeed.config, dtype=cfg.policy.dtype)
    engine = train_engine(load_policy(ctx), lr=d.lr, total_steps=data.steps, final_ratio=d.lr_final_ratio,
                          config=engine_cfg)
    reference = frozen_model(load_policy(ctx), zero_stage=cfg.deepspeed.zero_stage, config=engine_cfg,
                             device=torch.device("cpu"))
    ref_logps, t_pre = None, 0.0
    if precompute:
        t = time.perf_counter()

        @torch.no_grad()
        def ref_fn(idx: list[int]) -> torch.Tensor:
            chosen, rejected = pair_logprobs(reference, collate_pairs(data.pairs, idx, tokenizer.pad_token_id))
            return torch.stack([chosen, rejected])

        ref_logps = sharded_map(len(data.pairs), ref_fn, 0, 1, d.logprob_batch_size)  # (2, M)
        t_pre = time.perf_counter() - t
    return Ours(engine, reference, ref_logps, ctx.work_dir / f"dpo_{tag}_train_stats.jsonl"), t_pre


def our_epoch(ours: Ours, data: Data, d, pad_token_id: int, seed: int) -> list[float]:
    """One epoch of loops/dpo.py's per-step work: its batch selection and its `preference_step`
    (log-probs, loss, backward, step, statistics), without evaluation and checkpoints.
    Returns the step losses."""
    from rlhf_overopt.data.preferences import collate_pairs
    from rlhf_overopt.run.directory import append_jsonl
    from rlhf_overopt.run.seeds import batch_indices
    from rlhf_overopt.update import preference_step

    engine, n, device = ours.engine, len(data.pairs), torch.device("cpu")
    losses = []
    for step in range(data.steps):
        t0 = time.time()
        # 4. batch
        idx = batch_indices(step, data.steps, d.batch_size, n, seed, 0, 1)
        batch = collate_pairs(data.pairs, idx.tolist(), pad_token_id).to(device)
        # 5-6. log-probs, loss, update (the real loop's step function)
        step_stats = preference_step(engine, ours.reference, batch, idx, ours.ref_logps, None, d, step)
        # 7. step statistics
        done = step + 1
        stats = {"step": done, "epoch": done / data.steps, **step_stats, "lr": engine.get_lr()[0],
                 "time_step_s": time.time() - t0}
        append_jsonl(ours.stats_path, [stats])
        losses.append(stats["loss"])
    return losses


# -- TRL -------------------------------------------------------------------------------------------


def epoch_clock():
    """A TrainerCallback that records when TRL's epoch loop starts and ends inside train(), and the
    torch thread count it runs at."""
    from transformers import TrainerCallback

    class EpochClock(TrainerCallback):
        def __init__(self) -> None:
            self.begin = self.end = 0.0
            self.threads = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.threads = torch.get_num_threads()
            self.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    return EpochClock()


@contextlib.contextmanager
def plain_single_process() -> Iterator[None]:
    """Let TRL set up accelerate as in a plain `python train.py`: without the launcher variables of
    our one-rank DeepSpeed group, which would make accelerate choose its multi-CPU mode (and set
    torch to all physical cores). Accelerate fixes its state when first made; a state left in
    another mode by an earlier section is reset."""
    from accelerate.state import AcceleratorState, PartialState

    saved = {k: os.environ.pop(k) for k in LAUNCHER_VARIABLES if k in os.environ}
    if PartialState._shared_state and PartialState().distributed_type != "NO":
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        os.environ.update(saved)


def build_trl(ctx: BenchContext, d, data: Data, tokenizer, precompute: bool, tag: str, checkpointing: bool = False):
    """A DPOTrainer on the same policy, pairs (in our epoch order), batch size and optimizer settings.

    TRL's DPOConfig turns activation (gradient) checkpointing on by default, which recomputes every
    forward in the backward pass; ours does not checkpoint, so the comparison turns it off
    (`checkpointing=True` keeps TRL's default)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    ordered = {c: [v[i] for i in data.order] for c, v in data.columns.items()}
    with plain_single_process():
        args = DPOConfig(
            output_dir=str(ctx.work_dir / f"trl_{tag}"), beta=d.beta, loss_type=["sigmoid"], learning_rate=d.lr,
            per_device_train_batch_size=d.batch_size, num_train_epochs=1, max_length=data.max_length,
            precompute_ref_log_probs=precompute, precompute_ref_batch_size=d.logprob_batch_size,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_epsilon=1e-5,
            max_grad_norm=d.max_grad_norm, train_sampling_strategy="sequential", dataloader_drop_last=True,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            # bf16=False: TRL otherwise runs its models under a bf16 autocast on CPU (see tests/test_dpo.py)
            use_cpu=True, bf16=False, fp16=False, seed=ctx.config.seed,
            **({} if checkpointing else {"activation_checkpointing": False}))
        clock = epoch_clock()
        trainer = DPOTrainer(model=load_policy(ctx), args=args, train_dataset=Dataset.from_dict(ordered),
                             processing_class=tokenizer, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # logging is off: no end-of-training metrics line on stdout
    return trainer, clock


# -- shared ----------------------------------------------------------------------------------------


def load_policy(ctx: BenchContext) -> torch.nn.Module:
    from rlhf_overopt.run.models import load_causal_lm

    cfg = ctx.config
    return load_causal_lm(str(ctx.testbed.policy_dir), dtype=getattr(torch, cfg.policy.dtype),
                          dropout_off=cfg.policy.dropout_off)


def same_tokens(trainer, data: Data) -> bool:
    """TRL's tokenized rows equal ours (prompt, chosen + EOS, rejected + EOS), pair by pair."""
    rows = trainer.train_dataset
    for j, i in enumerate(data.order):
        row = rows[j]
        if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != (
                data.pairs.prompt_ids[i], data.pairs.chosen_ids[i], data.pairs.rejected_ids[i]):
            return False
    return True


def max_weight_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sb = b.state_dict()
    return max(float((v - sb[k]).abs().max()) for k, v in a.state_dict().items() if k in sb)


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Raise these loggers to WARNING for the block (accelerate says at INFO, on every last batch of
    an epoch, that its dataset had no length)."""
    previous = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


def run(ctx: BenchContext) -> list[Row]:
    with quiet("accelerate", "transformers", "trl"):
        return measure(ctx)


def measure(ctx: BenchContext) -> list[Row]:
    from rlhf_overopt.run.engines import ensure_process_group
    from rlhf_overopt.run.models import context_length

    torch.manual_seed(ctx.config.seed)
    cfg = ctx.config
    d = dpo_settings(ctx)
    repeats = min(ctx.repeats, 3)  # an epoch takes seconds; 3 interleaved repeats keep the section near 2 minutes
    tokenizer = ctx.testbed.load_tokenizer()
    max_length = d.max_length or context_length(load_policy(ctx).config) or 1024
    data = load_data(ctx, d, tokenizer, max_length)

    # 1. both implementations, with and without precomputed reference log-probs, and TRL as it
    # comes (activation checkpointing on)
    trl = {pre: build_trl(ctx, d, data, tokenizer, pre, label(pre)) for pre in (True, False)}
    trl_default = build_trl(ctx, d, data, tokenizer, True, "default", checkpointing=True)
    ensure_process_group(torch.device("cpu"))
    ours, precompute_s = {}, {}
    for pre in (True, False):
        ours[pre], precompute_s[pre] = build_ours(ctx, d, data, tokenizer, pre, label(pre))
    torch.set_num_threads(ctx.threads)

    # 2. first epoch of each: the correctness check (and the warm-up)
    check = {}
    for pre in (True, False):
        losses = our_epoch(ours[pre], data, d, tokenizer.pad_token_id, cfg.seed)
        trainer, _ = trl[pre]
        first_trl = first_step_loss_trl(trainer)
        out = trainer.train()
        check[pre] = {"ours_first": losses[0], "trl_first": first_trl, "ours_mean": statistics.mean(losses),
                      "trl_mean": out.training_loss,
                      "weights": max_weight_difference(ours[pre].engine.module, trainer.model)}
    trl_default[0].train()

    # 3. timed epochs, interleaved
    epochs: dict[str, Callable[[], float | None]] = {}
    for pre in (True, False):
        epochs[f"ours {label(pre)}"] = lambda pre=pre: ours_epoch_untimed_loop(ours[pre], data, d,
                                                                               tokenizer.pad_token_id, cfg.seed)
        epochs[f"trl {label(pre)}"] = lambda pre=pre: trl_epoch(*trl[pre])
    epochs["trl default"] = lambda: trl_epoch(*trl_default)
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, epoch in epochs.items():
            t = time.perf_counter()
            loop = epoch()
            times.setdefault(name, []).append(time.perf_counter() - t)
            if loop is not None:
                times.setdefault(f"{name} loop", []).append(loop)
    med = {k: statistics.median(v) for k, v in times.items()}

    rows = []
    for pre in (True, False):
        ref = "precomputed reference log-probs" if pre else "reference forward every step"
        o, t, loop = med[f"ours {label(pre)}"], med[f"trl {label(pre)}"], med[f"trl {label(pre)} loop"]
        rows += [
            Row(SECTION, f"ours, epoch ({ref})", o, "s", note=f"{data.steps} steps of {d.batch_size} pairs"),
            Row(SECTION, f"TRL trainer.train() ({ref})", t, "s",
                note=f"of which the epoch loop (on_train_begin..end) {loop:.3f} s"),
            Row(SECTION, f"target: our epoch vs TRL ({ref})", o / t, "x", ratio=o / t, baseline="TRL trainer.train()",
                target=f"<= {EPOCH_TARGET}x TRL's", met=o / t <= EPOCH_TARGET),
            Row(SECTION, f"our epoch vs TRL's epoch loop alone ({ref})", o / loop, "x", ratio=o / loop,
                baseline="TRL on_train_begin..on_train_end", note="TRL's per-call setup left out"),
        ]
        c = check[pre]
        worst = max(abs(c["ours_first"] - c["trl_first"]), abs(c["ours_mean"] - c["trl_mean"]))
        rows.append(Row(SECTION, f"loss agreement ({ref})", worst, "abs", target=f"<= {LOSS_TOLERANCE}",
                        met=worst <= LOSS_TOLERANCE,
                        note=f"first step {c['ours_first']:.6f} vs {c['trl_first']:.6f}; epoch mean "
                             f"{c['ours_mean']:.6f} vs {c['trl_mean']:.6f}; max |weight diff| after the epoch "
                             f"{c['weights']:.2e}"))
    o = med[f"ours {label(True)}"]
    rows += [
        Row(SECTION, "TRL as it comes: activation checkpointing on (precomputed ref)", med["trl default"], "s",
            ratio=med["trl default"] / o, baseline="ours, epoch (precomputed reference log-probs)",
            note="DPOConfig's default; recomputes the forward in the backward"),
        Row(SECTION, "ours: reference log-probs precompute", precompute_s[True], "s",
            note=f"{len(data.pairs)} pairs, batches of {d.logprob_batch_size}; before training, not timed"),
    ]
    profile = phase_profile(ours[True], trl[True][0], data, d, tokenizer.pad_token_id, cfg.seed)
    ctx.extra[f"{SECTION}_notes"] = notes(ctx, d, data, trl[True], repeats) + "\n\n" + profile
    return rows


def label(precompute: bool) -> str:
    return "precomputed" if precompute else "live"


def ours_epoch_untimed_loop(ours: Ours, data: Data, d, pad_token_id: int, seed: int) -> None:
    """our_epoch for the timing loop: the whole call is the epoch, there is no separate loop time."""
    our_epoch(ours, data, d, pad_token_id, seed)


def trl_epoch(trainer, clock) -> float:
    """One trainer.train() call; returns the time of its epoch loop (on_train_begin..on_train_end)."""
    trainer.train()
    return clock.end - clock.begin


def dpo_settings(ctx: BenchContext):
    """The dpo section of the DPO job's config (configs/dpo.yaml); batches of 8 with --quick."""
    from bench.common import ROOT
    from rlhf_overopt.config.load import load_config

    d = load_config(ROOT / "configs" / "dpo.yaml", check_paths=False).dpo
    return dataclasses.replace(d, batch_size=8) if ctx.quick else d


def first_step_loss_trl(trainer) -> float:
    """TRL's loss on the first batch at the starting weights: its compute_loss on the rows the
    sequential sampler gives first."""
    batch = trainer.data_collator([trainer.train_dataset[j] for j in range(trainer.args.per_device_train_batch_size)])
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def notes(ctx: BenchContext, d, data: Data, trl, repeats: int) -> str:
    trainer, clock = trl
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in
               zip(data.pairs.prompt_ids, data.pairs.chosen_ids, data.pairs.rejected_ids)]
    return (
        f"{len(data.pairs)} testbed preference pairs, {data.steps} steps of {d.batch_size} pairs per epoch, beta "
        f"{d.beta}, lr {d.lr}, prompt + longest response {min(lengths)}–{max(lengths)} tokens (cap "
        f"{data.max_length}, {data.pairs.n_truncated} pairs truncated). TRL {trainer.args.optim} optimizer; ours "
        f"AdamW inside a 1-rank DeepSpeed ZeRO-{ctx.config.deepspeed.zero_stage} engine, as loops/dpo.py builds it. "
        f"Token ids identical in both: {'yes' if same_tokens(trainer, data) else '**no**'}. Medians of "
        f"{repeats} interleaved epochs; the first epoch of each run is the untimed correctness check. "
        f"Torch threads: ours {torch.get_num_threads()}, TRL {clock.threads} (read inside its training loop); "
        f"accelerate mode {trainer.accelerator.distributed_type}."
    )


def phase_profile(ours: Ours, trainer, data: Data, d, pad_token_id: int, seed: int, top: int = 10) -> str:
    """Top operators by self CPU time over one epoch of each implementation (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    def ops(fn: Callable[[], Any]) -> dict[str, float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}

    mine = ops(lambda: our_epoch(ours, data, d, pad_token_id, seed))
    theirs = ops(trainer.train)
    names = list(dict.fromkeys(sorted(mine, key=mine.get, reverse=True)[:top]
                               + sorted(theirs, key=theirs.get, reverse=True)[:top]))
    intro = ("**Where the time goes.** One more epoch of each, precomputed reference, under torch.profiler (self "
             "CPU seconds by operator, top 10 of each). Both run the same model on the same batches; TRL's trainer "
             "patches a fused LM head that also computes per-token entropy, mean logit and top-1 accuracy for its "
             "metrics (`add_fused_lm_head(outputs=(\"log_probs\", \"entropy\", \"mean_logits\", \"is_top1\"))`), "
             "ours keeps only the response positions' logits (`logits_to_keep`) and one log-softmax.")
    lines = [intro, "", "| operator | ours | TRL |", "|---|---:|---:|"]
    lines += [f"| `{n}` | {mine.get(n, 0.0):.3f} | {theirs.get(n, 0.0):.3f} |" for n in names]
    lines.append(f"| total | {sum(mine.values()):.3f} | {sum(theirs.values()):.3f} |")
    return "\n".join(lines)

