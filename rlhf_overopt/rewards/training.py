"""Proxy reward-model training: one Bradley–Terry loop for every kind of ensemble.

`train_ensemble` trains K members on (noisy) preference labels and returns a checked,
standardized `ProxyEnsemble`, saved when asked. Per kind (rlhf_overopt/rewards/members.py):

- ``independent``: K full sequence-classification models from the same backbone; member i uses
  seed `seed + i` for its head init and data order (Coste et al. 2023: "same data and
  hyperparameters, different seeds"; Eisenstein et al. 2023: a "finetune ensemble"). On a CPU
  the members can train at once in spawned worker processes, with bit-identical weights.
- ``pretrain``: member i's backbone comes from its own pretraining run, `make_backbone(1000 +
  seed + i)` (Eisenstein et al. 2023: pretrain ensembles beat finetune ensembles).
- ``warm``: K members trained as independent ones but from ONE initialization: the same backbone
  and the same head init (seed `seed` for every member), differing only in data order (seed `seed
  + i`); their weights are then averaged uniformly into one model (`rlhf_overopt.ops.warm`; Ramé et
  al. 2024, "WARM", arXiv:2401.12187), the ensemble's single member, and the K members are kept
  under members/.
- ``multihead``: one shared transformer and a Linear(d, K) head. Heads differ by init seed and,
  with `multihead_bootstrap`, by data: each head's Bradley–Terry loss is computed on its own
  resample with replacement of every batch (an online bootstrap), and the loss summed over heads
  trains the shared trunk.
- ``lora``: one frozen sequence-classification base and K peft LoRA adapters, each with its own
  seeded LoRA init and its own copy of the score head (peft `modules_to_save`), trained one by
  one.

Preference data is tokenized once (`encode_pairs`) for training and validation, with the
backbone's own tokenizer (`proxy_tokenizer`: a pad distinct from EOS is added when missing and the
members' embeddings grow by its row), so proxies read text and any policy tokenizer works.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rlhf_overopt.config.sections import ProxyConfig
from rlhf_overopt.data.preferences import GOLD_COLUMNS, EncodedPairs, column_of
from rlhf_overopt.errors import InputError
from rlhf_overopt.ops.losses import bradley_terry_loss
from rlhf_overopt.ops.warm import average_state_dicts, state_dict_hash
from rlhf_overopt.rewards.ensemble import ProxyEnsemble
from rlhf_overopt.rewards.members import (
    LoraMembers,
    MultiHeadMembers,
    MultiHeadRewardModel,
    SeparateMembers,
    WarmMembers,
)
from rlhf_overopt.run.models import (
    backbone_from_pretrained,
    check_tokenizer,
    context_length,
    init_reward_head_,
    left_pad,
    quiet_transformers,
    reward_head,
    reward_model_from_pretrained,
    reward_scores,
    tokenize_for_reward,
)
from rlhf_overopt.run.progress import bar

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("independent", "pretrain", "multihead", "lora", "warm")
PRETRAIN_SEED_OFFSET = 1000
"""Member i of a pretrain ensemble gets its backbone from `make_backbone(1000 + seed + i)`."""
PAD_TOKEN = "<|pad|>"
"""The pad token added to a proxy backbone's tokenizer that has none distinct from EOS."""


# ---------------------------------------------------------------------------------------------
# Preference data
# ---------------------------------------------------------------------------------------------


def _column(dataset, name: str, default: Any) -> list:
    if name in dataset.column_names:
        return list(dataset[name])
    return [default] * len(dataset)


def encode_pairs(dataset, tokenizer, max_length: int) -> EncodedPairs:
    """Tokenize a preference `datasets.Dataset` once, for training and evaluation.

    Needs columns prompt, chosen, rejected; chosen_ended / rejected_ended default to True (a
    finished text) and gold_chosen / gold_rejected (the testbed's chosen_gold / rejected_gold, found
    by `column_of`), when present, give the clean labels.
    """
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"preference dataset lacks column(s) {missing}; has {dataset.column_names}")
    prompts = list(dataset["prompt"])
    chosen = tokenize_for_reward(
        tokenizer, prompts, list(dataset["chosen"]), _column(dataset, "chosen_ended", True), max_length
    )
    rejected = tokenize_for_reward(
        tokenizer, prompts, list(dataset["rejected"]), _column(dataset, "rejected_ended", True), max_length
    )
    better = tie = None
    gold_chosen, gold_rejected = (column_of(dataset.column_names, c) for c in GOLD_COLUMNS)
    if gold_chosen is not None and gold_rejected is not None:
        gold_c = torch.as_tensor(list(dataset[gold_chosen]), dtype=torch.float64)
        gold_r = torch.as_tensor(list(dataset[gold_rejected]), dtype=torch.float64)
        better, tie = gold_c > gold_r, gold_c == gold_r
    return EncodedPairs(chosen, rejected, better, tie)


def reference_responses(dataset) -> tuple[list[str], list[str], list[bool]]:
    """(prompts, responses, ended) of every response in a preference dataset, chosen then rejected.

    These are initial-policy samples: the reference distribution for standardization.
    """
    prompts = list(dataset["prompt"])
    responses = list(dataset["chosen"]) + list(dataset["rejected"])
    ended = [
        bool(e) for e in _column(dataset, "chosen_ended", True) + _column(dataset, "rejected_ended", True)
    ]
    return prompts + prompts, responses, ended


# ---------------------------------------------------------------------------------------------
# The backbone's own tokenizer, vocabulary and context
# ---------------------------------------------------------------------------------------------


def proxy_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The backbone's own tokenizer, ready for reward modelling: left padding and truncation (the
    end of a response carries the score) and a pad token distinct from EOS.

    Proxies read text, so their tokenizer need not be the policy's. One without a pad distinct
    from EOS (Pythia, Llama ship none) gets PAD_TOKEN added: a pad equal to EOS would make "the
    response ended" invisible to the reward model. The members' embeddings are then resized
    (`fit_embeddings`).
    """
    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise InputError(f"proxy.backbone: the tokenizer of {path} has no eos_token; responses could never be "
                         "marked as ended")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        logger.info("proxy.backbone %s: its tokenizer has no pad token distinct from EOS; added %s (id %d), "
                    "member embeddings are resized to %d rows", path, PAD_TOKEN, tokenizer.pad_token_id,
                    len(tokenizer))
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer


def check_backbone_vocabulary(tokenizer, config, where: str) -> None:
    """Every token id but an added pad must have an embedding row in the backbone; the pad may lie
    beyond them (fit_embeddings adds its row)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text_config, "vocab_size", None)
    if not isinstance(rows, int):
        return
    needed = len(tokenizer) - (tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= rows)
    if needed > rows:
        raise InputError(f"proxy.backbone: the tokenizer has {needed} tokens but {where}'s embedding has only "
                         f"{rows} rows (mismatched vocabulary)")


def fit_embeddings(model: nn.Module, n_tokens: int) -> nn.Module:
    """Grow the input embeddings to `n_tokens` rows (len(tokenizer)) when the tokenizer outgrew them
    (an added pad); the new rows are the mean of the old ones, so no random draw changes a member's
    init (and the caller's RNG stream is left untouched)."""
    rows = model.get_input_embeddings().num_embeddings
    if n_tokens > rows:
        with torch.random.fork_rng(devices=[]), quiet_transformers():
            model.resize_token_embeddings(n_tokens, mean_resizing=False)
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[rows:] = weight[:rows].mean(dim=0)
    return model


def check_context(tokenizer, datasets: Sequence[Any], max_length: int, context: int | None, where: str) -> None:
    """The proxies' token cap must hold every response (+ EOS) whole: the cap keeps a text's end,
    so a cap shorter than a response would cut that response, then the prompt, away unseen."""
    if context is not None and max_length > context:
        raise InputError(f"proxy.max_length={max_length} exceeds the {context} positions of proxy.backbone {where}")
    longest, split, row = 0, "", -1
    for name, dataset in zip(("train", "validation"), datasets):
        for side in ("chosen", "rejected"):
            ended = _column(dataset, f"{side}_ended", True)
            ids = tokenizer(list(dataset[side]), add_special_tokens=False)["input_ids"]
            for i, (tokens, end) in enumerate(zip(ids, ended)):
                if len(tokens) + bool(end) > longest:
                    longest, split, row = len(tokens) + bool(end), name, i
    if longest > max_length:
        raise InputError(
            f"proxy.max_length: proxies read at most {max_length} tokens (proxy.max_length, else the context of "
            f"proxy.backbone {where}) but a response of the {split} split (row {row}) has {longest}; responses "
            "would be cut away; raise proxy.max_length or use a backbone with a longer context")


# ---------------------------------------------------------------------------------------------
# Bradley–Terry fitting (one loop for every kind)
# ---------------------------------------------------------------------------------------------


def _fit_bradley_terry(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Sequence[nn.Parameter],
    pairs: EncodedPairs,
    *,
    pad_token_id: int,
    n_heads: int,
    cfg: ProxyConfig,
    seed: int,
    device: torch.device,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    """Train `params` with AdamW on the Bradley–Terry loss over `pairs`; returns last-epoch stats.

    `forward(input_ids, attention_mask) -> (B, n_heads)` scores. Chosen and rejected of a batch
    go through one forward (left-padded together). Data order comes from a generator seeded with
    `seed`. With several heads the loss is the sum of each head's BT loss; with
    `cfg.multihead_bootstrap` each head sees its own resample with replacement of the batch.
    """
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(seed)
    boot_gen = torch.Generator().manual_seed(seed + 1)
    n = len(pairs)
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    progress_bar = bar(total=steps, desc=desc, disable=not progress, leave=False)
    stats: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=order_gen).tolist()
        loss_sum = acc_sum = 0.0
        n_steps = 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            b = len(idx)
            ids, mask = left_pad(
                [pairs.chosen[i] for i in idx] + [pairs.rejected[i] for i in idx], pad_token_id
            )
            scores = forward(ids.to(device), mask.to(device))  # (2b, H)
            chosen, rejected = scores[:b], scores[b:]
            loss = scores.new_zeros(())
            acc = 0.0
            for h in range(n_heads):
                if n_heads > 1 and cfg.multihead_bootstrap:
                    sel = torch.randint(0, b, (b,), generator=boot_gen).to(device)
                    loss_h, acc_h = bradley_terry_loss(chosen[sel, h], rejected[sel, h], cfg.offset_eta)
                else:
                    loss_h, acc_h = bradley_terry_loss(chosen[:, h], rejected[:, h], cfg.offset_eta)
                loss = loss + loss_h
                acc += float(acc_h) / n_heads
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_loss = loss.item() / n_heads
            loss_sum += step_loss
            acc_sum += acc
            n_steps += 1
            progress_bar.update(1)
            progress_bar.set_postfix(epoch=epoch, loss=f"{step_loss:.3f}", acc=f"{acc:.2f}")
        stats = {"train_loss": loss_sum / max(n_steps, 1), "train_accuracy": acc_sum / max(n_steps, 1)}
    progress_bar.close()
    return stats


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _one_head(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A sequence-classification reward model as a (B, T) -> (B, 1) training forward."""
    return lambda input_ids, attention_mask: reward_scores(model, input_ids, attention_mask)[:, None]


def _lora_config(cfg: ProxyConfig, base: nn.Module):
    from peft import LoraConfig, TaskType
    from transformers.pytorch_utils import Conv1D

    # GPT-2 style Conv1D layers store weights transposed (fan_in_fan_out).
    conv1d = any(isinstance(m, Conv1D) for m in base.modules())
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        fan_in_fan_out=conv1d,
    )


def _member_model(path: str, tokenizer_len: int, pad: int, seed: int, cfg: ProxyConfig) -> nn.Module:
    """One sequence-classification member from `path`, its embeddings fit to the tokenizer.

    A pad added beyond the checkpoint's rows cannot be the embedding's padding_idx while the model
    is built (torch refuses it), so the model is built without one and told its pad once resized;
    the transformers classes read config.pad_token_id at each forward.
    """
    model = reward_model_from_pretrained(path, pad_token_id=pad if pad < _config_rows(path) else None,
                                         seed=seed, n_layer=cfg.n_layer)
    fit_embeddings(model, tokenizer_len)
    model.config.pad_token_id = pad
    return model


def _config_rows(path: str) -> int:
    """The checkpoint's vocabulary size (its embedding rows); a large number when unstated."""
    from transformers import AutoConfig

    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(path))
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(config, "vocab_size", None)
    return rows if isinstance(rows, int) else 2**62


def member_workers(requested: int, k: int, device: torch.device | str) -> int:
    """Processes that train independent members at once: 1 on an accelerator or for one member;
    `requested` if set; else as many as the usable cores allow at this process's thread count."""
    if torch.device(device).type != "cpu" or k <= 1:
        return 1
    if requested:
        return min(requested, k)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(k, cores // max(torch.get_num_threads(), 1)))


def _member_worker(job: dict[str, Any]) -> tuple[int, bytes, dict[str, float], str]:
    """One independent (or warm) member trained in a worker process: its weights as safetensors
    bytes, its last-epoch statistics and the hash of its initial weights. Same seeds, thread count
    and data as the in-process path, so the same weights."""
    from safetensors.torch import save

    torch.set_num_threads(job["threads"])
    model = _member_model(job["path"], job["vocab"], job["pad"], job["init_seed"], job["cfg"])
    init_hash = state_dict_hash(model.state_dict())
    model.train()
    stats = _fit_bradley_terry(_one_head(model), list(model.parameters()), job["pairs"], pad_token_id=job["pad"],
                               n_heads=1, cfg=job["cfg"], seed=job["seed"], device=torch.device("cpu"),
                               desc=job["name"], progress=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return job["index"], save(state), stats, init_hash


def _train_members_in_processes(paths: Sequence[str], names: Sequence[str], seeds: Sequence[int],
                                init_seeds: Sequence[int], pairs: EncodedPairs, pad: int, vocab: int,
                                cfg: ProxyConfig, workers: int,
                                progress: bool) -> tuple[list[nn.Module], list[str]]:
    """Train independent members in `workers` spawned processes (CPU): member i's head is
    initialized from init_seeds[i] and its data ordered by seeds[i]. Returns the members in order,
    in eval mode, and the hashes of their initial weights. Weights travel back as safetensors
    bytes, not pickles."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from safetensors.torch import load

    threads = torch.get_num_threads()
    jobs = [{"index": i, "name": names[i], "path": str(paths[i]), "seed": seeds[i], "init_seed": init_seeds[i],
             "pad": pad, "vocab": vocab, "cfg": cfg, "pairs": pairs, "threads": threads}
            for i in range(len(names))]
    logger.info("training %d proxy members in %d processes (%d thread(s) each)", len(jobs), workers, threads)
    states: dict[int, dict[str, torch.Tensor]] = {}
    init_hashes: dict[int, str] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_member_worker, job) for job in jobs]
        with bar(total=len(jobs), desc="proxy members", unit="member", disable=not progress) as pbar:
            for future in as_completed(futures):
                index, blob, stats, init_hashes[index] = future.result()
                states[index] = load(blob)
                logger.info("proxy %s: last epoch train loss %.4f, accuracy %.3f", names[index],
                            stats["train_loss"], stats["train_accuracy"])
                pbar.update(1)
    models = []
    for i in range(len(jobs)):
        model = _member_model(paths[i], vocab, pad, init_seeds[i], cfg)
        model.load_state_dict(states[i])
        models.append(model.eval())
    return models, [init_hashes[i] for i in range(len(jobs))]


def _warm_average(models: Sequence[nn.Module], init_hashes: Sequence[str], path: str, vocab: int, pad: int,
                  init_seed: int, cfg: ProxyConfig) -> nn.Module:
    """One model holding the uniform weight average of `models` (WARM), which must all have started
    from the same weights (equal `init_hashes`, else RuntimeError); in eval mode, on the CPU."""
    if len(set(init_hashes)) != 1:
        raise RuntimeError(f"kind=warm: the members did not start from one initialization (init hashes "
                           f"{list(init_hashes)}); their weights cannot be averaged")
    average = _member_model(path, vocab, pad, init_seed, cfg)
    average.load_state_dict(average_state_dicts([m.state_dict() for m in models]))
    return average.eval()


def train_ensemble(
    kind: str,
    backbone_path: str | os.PathLike | None,
    tokenizer,
    prefs_train,
    prefs_val,
    out_dir: str | os.PathLike | None,
    cfg: ProxyConfig,
    *,
    seed: int = 0,
    make_backbone: Callable[[int], str | os.PathLike] | None = None,
    reference: tuple[Sequence[str], Sequence[str], Sequence[bool]] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ProxyEnsemble:
    """Train a K-member proxy ensemble with the Bradley–Terry loss on (noisy) preference labels.

    kind: independent | pretrain | multihead | lora | warm (module docstring; warm needs cfg.k >= 2).
    `backbone_path` is a causal-LM or sequence-classification checkpoint (the SFT policy, or any
    other); for kind=pretrain it is unused and member i's backbone is `make_backbone(1000 + seed + i)`.
    `tokenizer` is the backbone's own (`proxy_tokenizer`), which need not be the policy's: members
    whose embeddings lack a row for its (added) pad token are resized. Before training the
    vocabulary and the context (every response must fit the token cap) are checked.
    prefs_train / prefs_val: `datasets.Dataset` with prompt, chosen, rejected and optionally
    chosen_ended, rejected_ended, gold_chosen / gold_rejected (or chosen_gold / rejected_gold);
    "chosen" is the noisy label.
    Per member: AdamW (cfg.lr, cfg.weight_decay), cfg.epochs over prefs_train in batches of
    cfg.batch_size pairs, offset regularizer cfg.offset_eta (Eisenstein et al. 2023). Then
    validation accuracies are recorded, failed members handled per cfg.on_failed_member,
    standardization statistics fitted on `reference` (default: every response in prefs_val),
    and the ensemble is saved to `out_dir` (skipped when None).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown proxy kind {kind!r} (known: {', '.join(KINDS)})")
    if cfg.k < 1:
        raise ValueError(f"proxy.k must be >= 1, got {cfg.k}")
    if kind == "warm" and cfg.k < 2:
        raise ValueError(f"proxy.k must be >= 2 for kind=warm (it averages the weights of K members), "
                         f"got {cfg.k}")
    if cfg.max_length < 0 or cfg.weight_decay < 0:
        raise ValueError("proxy.max_length and proxy.weight_decay must be >= 0")
    if kind == "pretrain" and make_backbone is None:
        raise ValueError(
            "kind=pretrain needs make_backbone(seed) -> path of a differently seeded pretrained model"
        )
    if kind != "pretrain" and backbone_path is None:
        raise ValueError(f"kind={kind} needs a backbone_path")
    check_tokenizer(tokenizer)
    device = torch.device(device)
    pad, vocab = tokenizer.pad_token_id, len(tokenizer)
    names = [f"member_{i}" for i in range(cfg.k)]
    seeds = [seed + i for i in range(cfg.k)]
    backbones: list[str] = []  # recorded in ensemble.json: where each member started from

    def member_path(i: int) -> str:
        if kind == "pretrain":
            path = str(make_backbone(PRETRAIN_SEED_OFFSET + seeds[i]))
        else:
            path = str(backbone_path)
        backbones.append(path)
        return path

    def fit(forward, params, n_heads: int, fit_seed: int, desc: str) -> None:
        stats = _fit_bradley_terry(
            forward,
            params,
            train_pairs,
            pad_token_id=pad,
            n_heads=n_heads,
            cfg=cfg,
            seed=fit_seed,
            device=device,
            desc=desc,
            progress=progress,
        )
        logger.info(
            "proxy %s: last epoch train loss %.4f, accuracy %.3f",
            desc,
            stats["train_loss"],
            stats["train_accuracy"],
        )

    # 1. the first backbone fixes the context length, hence the token cap
    first_path = member_path(0)
    from transformers import AutoConfig

    with quiet_transformers():
        first_config = AutoConfig.from_pretrained(first_path)
    check_backbone_vocabulary(tokenizer, first_config, first_path)
    max_length = cfg.max_length or context_length(first_config) or 1024
    check_context(tokenizer, (prefs_train, prefs_val), max_length, context_length(first_config), first_path)
    train_pairs = encode_pairs(prefs_train, tokenizer, max_length)
    val_pairs = encode_pairs(prefs_val, tokenizer, max_length)
    if len(train_pairs) == 0:
        raise ValueError("the proxy training set is empty")

    # 2. build and train the members
    warm = None
    if kind in ("independent", "pretrain", "warm"):
        paths = [first_path] + [member_path(i) for i in range(1, cfg.k)]
        # warm members share one initialization, the reward head's too, and differ only in data
        # order (Ramé et al. 2024: weights fine-tuned from one init stay linearly mode connected).
        init_seeds = [seed] * cfg.k if kind == "warm" else seeds
        workers = member_workers(cfg.train_workers, cfg.k, device)
        if workers > 1:
            models, init_hashes = _train_members_in_processes(paths, names, seeds, init_seeds, train_pairs,
                                                              pad, vocab, cfg, workers, progress)
        else:
            models, init_hashes = [], []
            for i, name in enumerate(names):
                model = _member_model(paths[i], vocab, pad, init_seeds[i], cfg).to(device)
                if kind == "warm":
                    init_hashes.append(state_dict_hash(model.state_dict()))
                model.train()
                fit(_one_head(model), model.parameters(), 1, seeds[i], name)
                models.append(model.eval())
        if kind == "warm":
            average = _warm_average(models, init_hashes, first_path, vocab, pad, seed, cfg).to(device)
            trained = ProxyEnsemble(SeparateMembers("independent", names, models), tokenizer,
                                    max_length=max_length, score_batch_size=cfg.score_batch_size,
                                    standardize=False)
            noisy, clean = trained.evaluate(val_pairs)
            warm = {"k_averaged": cfg.k, "members": names, "init_seed": seed, "data_seeds": seeds,
                    "init_hash": init_hashes[0], "member_val_accuracy": noisy,
                    "member_val_accuracy_clean": clean}
            members = WarmMembers(["member_0"], [average], trained=models, trained_names=names)
        else:
            members = SeparateMembers(kind, names, models)
    elif kind == "multihead":
        backbone = fit_embeddings(backbone_from_pretrained(first_path, n_layer=cfg.n_layer), vocab)
        model = MultiHeadRewardModel(backbone, seeds).to(device)
        model.train()
        fit(model, model.parameters(), cfg.k, seed, f"{cfg.k} heads")
        members = MultiHeadMembers(names, model.eval())
    else:
        from peft import get_peft_model

        base = _member_model(first_path, vocab, pad, seed, cfg).to(device)
        base_state = dict(base.state_dict())
        lora_config = _lora_config(cfg, base)
        peft_model = None
        for i, name in enumerate(names):
            # LoRA A matrices are drawn from the global RNG: fork it so member i's init depends
            # on its seed only, and the caller's RNG stream is left untouched.
            with torch.random.fork_rng(devices=[]), quiet_transformers():
                torch.manual_seed(seeds[i])
                if peft_model is None:
                    peft_model = get_peft_model(base, lora_config, adapter_name=name)
                else:
                    peft_model.add_adapter(name, lora_config)
            peft_model.set_adapter(name)
            # Each adapter owns a copy of the score head; give it its own seeded init.
            init_reward_head_(reward_head(peft_model), torch.Generator().manual_seed(seeds[i]))
            peft_model.train()
            fit(_one_head(peft_model), peft_model.parameters(), 1, seeds[i], name)
        members = LoraMembers(names, peft_model.eval(), base_state)

    ensemble = ProxyEnsemble(
        members,
        tokenizer,
        max_length=max_length,
        score_batch_size=cfg.score_batch_size,
        standardize=cfg.standardize,
        score_method=cfg.score_method,
        train_config={**dataclasses.asdict(cfg), "kind": kind, "seed": seed, "member_backbones": backbones},
        warm=warm,
    )

    # 3. validation accuracy, failed members (for warm: of the average, beside its members')
    ensemble.check_members(val_pairs, cfg.min_accuracy, cfg.on_failed_member)
    if ensemble.warm is not None:
        ensemble.warm["averaged_val_accuracy"] = ensemble.val_accuracy["member_0"]
        ensemble.warm["averaged_val_accuracy_clean"] = ensemble.val_accuracy_clean["member_0"]
        logger.info("proxy warm: the average of %d members has val accuracy %.3f (members: %s)", cfg.k,
                    ensemble.warm["averaged_val_accuracy"],
                    ", ".join(f"{a:.3f}" for a in ensemble.warm["member_val_accuracy"].values()))

    # 4. standardization on initial-policy responses (Coste et al. 2023)
    ensemble.fit_standardization(*(reference if reference is not None else reference_responses(prefs_val)))

    # 5. save
    if out_dir is not None:
        ensemble.save(out_dir)
    return ensemble
