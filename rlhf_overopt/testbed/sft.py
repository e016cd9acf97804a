"""Supervised training of the testbed's initial policy: a small GPT-2 trained on the review corpus.

The policy learns to continue a review prefix and to end it with EOS. Reviews are packed whole
into rows of `n_positions` tokens, each followed by EOS; a row always starts at the start of a
review (so the policy sees reviews begin at position 0, as prompts do at generation time), and
the unused tail of a row is padding that is masked out of attention and loss. Packing keeps
about 95% of the computed tokens useful, against about half with one padded review per row.

The same function, called with other seeds, gives the "pretrain ensemble" of proxy backbones
(Eisenstein et al. 2023, §3): members that differ in their pre-training seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from rlhf_overopt.config.sections import TestbedConfig
from rlhf_overopt.run.progress import bar

logger = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.02
"""Share of the reviews held out of SFT to measure its loss."""
METRICS_FILE = "sft_metrics.json"
"""Name of the json with held-out loss and unigram baseline, written next to the weights."""
WARMUP_FRACTION = 0.05
"""Share of the SFT steps spent in linear learning-rate warm-up."""
MIN_LR_RATIO = 0.1
"""The cosine schedule decays to this fraction of the peak learning rate."""


def pack_rows(token_lists: Sequence[Sequence[int]], row_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily pack whole token sequences into rows of `row_len`, in the given order.

    A sequence that does not fit in the current row starts a new one; one longer than a row is
    truncated (the testbed's reviews never are). Returns `input_ids` (R, row_len) int64 padded
    with `pad_id`, and `mask` (R, row_len) bool, True on real tokens.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    for seq in token_lists:
        seq = list(seq[:row_len])
        if current and len(current) + len(seq) > row_len:
            rows.append(current)
            current = []
        current.extend(seq)
    if current:
        rows.append(current)
    ids = torch.full((len(rows), row_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), row_len), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


def lm_loss(model: GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over real target tokens of right-padded rows, and their count.

    ids, mask: (B, T). Position t predicts token t+1; targets that are padding are ignored.
    """
    logits = model(input_ids=ids, attention_mask=mask.long()).logits  # (B, T, V)
    targets = ids[:, 1:]
    valid = mask[:, 1:]
    flat = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    n = int(valid.sum())
    return (flat * valid.reshape(-1)).sum() / max(n, 1), n


def unigram_baseline(train_ids: torch.Tensor, train_mask: torch.Tensor, eval_ids: torch.Tensor,
                     eval_mask: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the train split's unigram distribution on the held-out targets.

    The targets are the same ones `lm_loss` scores (every real token but the first of a row).
    Add-one smoothing keeps tokens unseen in training finite.
    """
    counts = torch.bincount(train_ids[train_mask], minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    targets = eval_ids[:, 1:][eval_mask[:, 1:]]
    return float(-logp[targets].mean())


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars (shard writing/loading) and restore the setting."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads (0: unchanged) and restore the caller's setting.

    Small models gain little from a second thread, and on a shared CPU a thread that spins while
    its core is busy made training and sampling steps up to 10x slower (measured).
    """
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lr_lambda(steps: int):
    """Linear warm-up, then cosine decay to MIN_LR_RATIO of the peak."""
    warmup = max(1, int(WARMUP_FRACTION * steps))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def policy_config(cfg: TestbedConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2Config:
    """GPT-2 config of the testbed policy; all dropout is 0 (PPO needs deterministic log-probs)."""
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def _heldout_loss(model: GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor, batch_size: int) -> float:
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        loss, n = lm_loss(model, ids[start : start + batch_size], mask[start : start + batch_size])
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def train_sft_policy(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: TestbedConfig,
    seed: int,
    out_dir: str | Path,
    progress: bool = True,
    *,
    device: str | torch.device = "cpu",
) -> Path:
    """Train a GPT-2 policy on `texts` (each followed by EOS) and save it with the tokenizer.

    Size and schedule come from `cfg` (n_layer, n_embd, n_head, n_positions, sft_steps,
    sft_batch_size, sft_lr); `seed` fixes the held-out split, the initialization and the data
    order, so a given (texts, cfg, seed) gives identical weights on the same machine. AdamW with
    linear warm-up and cosine decay. 2% of the reviews are held out; `sft_metrics.json` records
    their loss next to the cross-entropy of a unigram model of the train split (a policy that
    learned nothing beyond token frequencies scores the baseline). The caller's global torch RNG
    and thread setting are left untouched; training runs on `cfg.num_threads` threads. Returns
    `out_dir`.
    """
    with torch_threads(cfg.num_threads):
        return _train(texts, tokenizer, cfg, seed, Path(out_dir), progress, torch.device(device))


def _train(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, cfg: TestbedConfig, seed: int, out: Path,
           progress: bool, device: torch.device) -> Path:
    """The body of `train_sft_policy`."""
    out.mkdir(parents=True, exist_ok=True)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None or eos == pad:
        raise ValueError("train_sft_policy: the tokenizer needs distinct EOS and PAD tokens")

    # 1. split: a seeded 2% of the reviews never enter training.
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_holdout = max(1, round(HOLDOUT_FRACTION * len(texts)))
    heldout_idx, train_idx = order[:n_holdout], order[n_holdout:]
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    train_ids, train_mask = pack_rows([encoded[i] + [eos] for i in train_idx], cfg.n_positions, pad)
    eval_ids, eval_mask = pack_rows([encoded[i] + [eos] for i in heldout_idx], cfg.n_positions, pad)
    logger.info("SFT data: %d train rows (%d tokens), %d held-out rows", train_ids.shape[0],
                int(train_mask.sum()), eval_ids.shape[0])

    # 2. model and optimizer, initialized under the seed without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(policy_config(cfg, tokenizer))
        row_gen = torch.Generator().manual_seed(seed)
    model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.sft_steps))

    # 3. train: epochs over the packed rows in a seeded order, `sft_steps` steps in all.
    perm = torch.randperm(train_ids.shape[0], generator=row_gen)
    cursor = 0
    show = progress and sys.stderr.isatty()
    steps_bar = bar(range(cfg.sft_steps), desc="SFT", disable=not show, leave=False)
    smoothed = float("nan")
    for _ in steps_bar:
        if cursor + cfg.sft_batch_size > perm.numel():
            perm, cursor = torch.randperm(train_ids.shape[0], generator=row_gen), 0
        rows = perm[cursor : cursor + cfg.sft_batch_size]
        cursor += cfg.sft_batch_size
        loss, _ = lm_loss(model, train_ids[rows].to(device), train_mask[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        value = loss.detach().item()
        smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
        steps_bar.set_postfix(loss=f"{smoothed:.3f}")

    # 4. evaluate against the unigram baseline and save.
    model.eval()
    heldout = _heldout_loss(model, eval_ids.to(device), eval_mask.to(device), cfg.sft_batch_size)
    unigram = unigram_baseline(train_ids, train_mask, eval_ids, eval_mask, len(tokenizer))
    metrics = {
        "heldout_loss": heldout,
        "unigram_loss": unigram,
        "train_loss_smoothed": smoothed,
        "n_train_reviews": len(train_idx),
        "n_heldout_reviews": len(heldout_idx),
        "n_train_tokens": int(train_mask.sum()),
        "n_heldout_targets": int(eval_mask[:, 1:].sum()),
        "epochs": cfg.sft_steps * cfg.sft_batch_size / max(1, train_ids.shape[0]),
        "seed": seed,
    }
    logger.info("SFT held-out loss %.3f nats/token (unigram baseline %.3f)", heldout, unigram)
    model.to("cpu")
    with quiet_transformers():
        model.save_pretrained(str(out))  # safetensors is the only format in transformers 5
    tokenizer.save_pretrained(str(out))
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return out
