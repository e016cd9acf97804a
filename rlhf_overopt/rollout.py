"""Rollouts: sample responses from a causal-LM policy and score tokens with per-token log-probs.

The PPO implementation details (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO") this module is responsible for:
- queries are left-padded with a pad token distinct from EOS, and position ids are computed from
  the attention mask, so a row's positions do not depend on how much padding it received;
- logits are divided by the sampling temperature in every log-prob pass (sampling, old log-probs,
  reference log-probs, the PPO update), otherwise the ratio at step 0 is not 1;
- responses are truncated at the first EOS, everything after it is the pad token and masked.
The sampler passes its KV cache under the name the installed transformers takes (`cache` in
5.24, `past_key_values` before; `cache_argument`), so no deprecation fires on every token.
Sources: Ziegler et al. 2019 (lm-human-preferences); Huang et al. 2024, "The N+ Implementation
Details of RLHF with PPO".

Shapes: B batch, Tq query width, Tr response width, V vocabulary, d hidden size.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from rlhf_overopt.ops.masking import has_eos, position_ids_from_mask, response_mask_after_eos
from rlhf_overopt.records import PromptBatch, Rollout


def _special_ids(tokenizer) -> tuple[int, int]:
    """(pad_token_id, eos_token_id), checked against the left-padding contract."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; responses could never end")
    if pad is None or pad == eos:
        # A pad equal to EOS makes "last real token" and "did the response end" ambiguous for
        # anything that looks at token ids (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO": a pad distinct from EOS).
        raise ValueError(
            f"the tokenizer needs a pad token distinct from EOS (pad={pad}, eos={eos}); "
            "add one, e.g. tokenizer.add_special_tokens({'pad_token': '<|pad|>'}), and resize the "
            "model's embeddings"
        )
    return pad, eos


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


_CACHE_ARGUMENT: dict[type, str] = {}


def cache_argument(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by: "cache" (newer 5.x releases; 5.24 has
    it), or "past_key_values" (5.0 and models whose forward does not name "cache").

    transformers 5.24 still accepts `past_key_values` but logs a deprecation on every call and
    drops it in 5.40, so the name is read from the forward signature, once per model class (a
    PeftModel is looked through to the model it wraps).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(base)
    if kind not in _CACHE_ARGUMENT:
        parameters = inspect.signature(base.forward).parameters
        _CACHE_ARGUMENT[kind] = "cache" if "cache" in parameters else "past_key_values"
    return _CACHE_ARGUMENT[kind]


def returned_cache(out):
    """The KV cache a forward with use_cache=True returned, under either name.

    Read through the output's keys, never its `past_key_values` attribute: in 5.24 that attribute
    is a compatibility property that logs the deprecation too.
    """
    keys = out.keys()
    return out["cache"] if "cache" in keys else out["past_key_values"]


def tokenize_prompts(
    tokenizer, prompts: Sequence[str], max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts into left-padded queries.

    Padding is always on the left (whatever `tokenizer.padding_side` says) so that every query
    ends at column Tq - 1 and responses can be appended after it. With `max_length`, long prompts
    keep their LAST `max_length` tokens: the end of a prompt is what the response continues.
    Special tokens the tokenizer adds by default (e.g. a BOS) are kept.
    Returns query_ids (B, Tq) int64 padded with the pad token and query_mask (B, Tq) int64.
    """
    pad, _ = _special_ids(tokenizer)
    encoded: list[list[int]] = tokenizer(list(prompts))["input_ids"]
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        encoded = [ids[-max_length:] for ids in encoded]
    for i, ids in enumerate(encoded):
        if not ids:
            # The first response token is predicted from the last query token; there is none.
            raise ValueError(f"prompt {i} ({prompts[i]!r}) is empty after tokenization")
    width = max(len(ids) for ids in encoded)
    query_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    query_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        query_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        query_mask[i, width - len(ids) :] = 1
    return query_ids, query_mask


def _nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the probabilities outside the top-p nucleus (Holtzman et al. 2020, §3.1).

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p: a token stays
    if the tokens ranked above it hold less than top_p, so the most likely token always stays.
    probs: (B, V). Returns (B, V), unnormalized.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_above >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)


@torch.no_grad()
def _generate_batch(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling loop with the KV cache for one batch of left-padded queries.

    The log-prob of each sampled token is read from the same logits it was sampled from:
    log_softmax(logits / temperature), before top-p filtering, which is what `sequence_logprobs`
    recomputes. Rows that produced EOS keep running (the batch is a block) but their later tokens
    are replaced by the pad token with log-prob 0; the loop stops once every row has ended.
    query_ids, query_mask: (B, Tq). Returns response_ids (B, Tr) and logprobs (B, Tr), Tr <= max_new_tokens.
    """
    batch = query_ids.shape[0]
    device = query_ids.device
    attention_mask = query_mask
    out = model(
        input_ids=query_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(query_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = returned_cache(out)
    cache_kwarg = cache_argument(model)
    next_logits = out.logits[:, -1, :]
    # Position of response token 0: the number of real query tokens.
    first_position = query_mask.sum(dim=-1)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    ones = torch.ones((batch, 1), dtype=attention_mask.dtype, device=device)
    tokens: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    for t in range(max_new_tokens):
        # float32 so that sampling log-probs match a float32 recomputation in low-precision models.
        logp_all = torch.log_softmax(next_logits.float() / temperature, dim=-1)
        probs = logp_all.exp()
        if top_p < 1.0:
            probs = _nucleus_filter(probs, top_p)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        logprob = logp_all.gather(-1, token.unsqueeze(-1)).squeeze(-1)
        logprobs.append(torch.where(finished, torch.zeros_like(logprob), logprob))
        tokens.append(token)
        finished = finished | (token == eos_token_id)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, ones], dim=-1)
        out = model(
            input_ids=token.unsqueeze(-1),
            attention_mask=attention_mask,
            position_ids=(first_position + t).unsqueeze(-1),
            use_cache=True,
            **{cache_kwarg: cache},
        )
        cache = returned_cache(out)
        next_logits = out.logits[:, -1, :]
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str] | PromptBatch,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    progress: str = "",
) -> Rollout:
    """Sample one response per prompt and return it with its sampling log-probs.

    Our own loop over `model(...)` with the KV cache (not `model.generate`): it reads the
    log-prob of each sampled token from the logits it was sampled from, and with a seeded
    `generator` (on the model's device) the result is reproducible for a given `batch_size`.
    Queries are left-padded with position ids from the attention mask; logits are divided by
    `temperature` and then filtered to the top-p nucleus for sampling, while `logprobs` are the
    unfiltered log_softmax(logits / temperature) that `sequence_logprobs` recomputes. Each row
    stops at its first EOS; after it come pad tokens, masked out. The model is put in eval mode
    (dropout off) for the call and its previous mode is restored.

    prompts: B strings, or a PromptBatch already tokenized (left-padded).
    batch_size: prompts per forward pass (all at once when None).
    progress: when non-empty, a progress bar over the batches with this description.
    Returns a Rollout with query (B, Tq) and response (B, Tr) tensors on the model's device,
    Tr <= max_new_tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    pad, eos = _special_ids(tokenizer)
    if isinstance(prompts, PromptBatch):
        texts, query_ids, query_mask = prompts.texts, prompts.query_ids, prompts.query_mask
    else:
        texts = list(prompts)
        query_ids, query_mask = tokenize_prompts(tokenizer, texts)
    n = query_ids.shape[0]
    if n == 0:
        raise ValueError("no prompts to generate from")
    step = n if batch_size is None else batch_size
    if step < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        chunks: list[Rollout] = []
        starts = range(0, n, step)
        if progress:
            from rlhf_overopt.run.progress import bar

            starts = bar(starts, desc=progress, unit="batch")
        for start in starts:
            ids = query_ids[start : start + step].to(device)
            mask = query_mask[start : start + step].to(device)
            # Drop the columns that are padding in every row of this chunk: less compute, same
            # result (positions come from the mask). Rollout.cat pads them back.
            width = int(mask.sum(dim=-1).max())
            ids, mask = ids[:, -width:], mask[:, -width:]
            response_ids, logprobs = _generate_batch(
                model,
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                eos_token_id=eos,
                pad_token_id=pad,
                generator=generator,
            )
            chunks.append(
                Rollout(
                    query_ids=ids,
                    query_mask=mask,
                    response_ids=response_ids,
                    response_mask=response_mask_after_eos(response_ids, eos),
                    logprobs=logprobs,
                    ended=has_eos(response_ids, eos),
                    prompts=texts[start : start + step],
                    responses=tokenizer.batch_decode(response_ids.tolist(), skip_special_tokens=True),
                    pad_token_id=pad,
                    temperature=temperature,
                )
            )
    finally:
        model.train(was_training)
    return chunks[0] if len(chunks) == 1 else Rollout.cat(chunks)


def sequence_logprobs(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the response under `model`: log pi(response_t | query, response_<t).

    One forward over cat(query, response) with the concatenated masks as attention mask and
    position ids from that mask. The logits at column Tq - 1 + t predict response token t; they
    are divided by `temperature` BEFORE the log-softmax, as at sampling time (Huang et al. 2024,
    "N+ details"), so with the sampling temperature this reproduces `Rollout.logprobs`. Masked
    positions are 0. Gradients flow to the model (PPO update); the caller decides train/eval mode
    and should have dropout disabled (Huang et al. 2024: dropout off).

    The entropy, if asked, is that of the full temperature-scaled distribution at each position:
    `H_t = -sum_v p_v log p_v`, 0 where masked.
    query_ids, query_mask: (B, Tq) left-padded; response_ids, response_mask: (B, Tr).
    Returns logprobs (B, Tr) float32, and entropy (B, Tr) float32 when return_entropy.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    response_len = response_ids.shape[1]
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        # Only the last Tr + 1 positions are needed; the last one predicts past the response.
        logits_to_keep=response_len + 1,
    )
    logits = out.logits[:, :-1, :].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    keep = response_mask.bool()
    logprobs = logp_all.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(keep, logprobs, torch.zeros_like(logprobs))
    if not return_entropy:
        return logprobs
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logprobs, torch.where(keep, entropy, torch.zeros_like(entropy))
