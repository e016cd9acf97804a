"""One PPO (or GRPO) update on fixed rollouts; run under `python` (1 rank) or `deepspeed --num_gpus 2`.

    python tests/dist/ppo_update_check.py OUT.pt STAGE [ppo | grpo-sequence | grpo-token | grpo-constant]
    deepspeed --num_gpus 2 tests/dist/ppo_update_check.py OUT.pt STAGE [...]

Every rank builds the same tiny policy, value model and global rollout batch of 8 (same seeds),
keeps its share of the rows, runs `ppo_update` (or `group_update`: two groups of 4 responses, one
per rank on 2 ranks, with the k3 KL to the reference in the loss), and rank 0 saves the full
parameters and the parameter count each rank held, so the test can compare 2 ranks against 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, PreTrainedTokenizerFast  # noqa: E402

from rlhf_overopt.run import dist  # noqa: E402
from rlhf_overopt.ops.advantages import gae, group_advantages  # noqa: E402
from rlhf_overopt.run.engines import (
    ds_config,
    ensure_process_group,
    gathered,
    local_parameter_count,
    train_engine,
)  # noqa: E402
from rlhf_overopt.rollout import generate, sequence_logprobs  # noqa: E402
from rlhf_overopt.run.seeds import step_generator  # noqa: E402
from rlhf_overopt.update import group_update, ppo_update  # noqa: E402
from rlhf_overopt.values import ValueModel, response_values  # noqa: E402

BATCH = 8


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = "the film was good bad great awful plot acting score not very but boring fun".split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   padding_side="left")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # deepspeed adds --local_rank
    out, stage = Path(args[0]), int(args[1])
    mode = args[2] if len(args) > 2 else "ppo"
    info = dist.init("cpu")
    ensure_process_group(info.device)
    info = dist.init("cpu")
    world, rank = info.world_size, info.rank
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    gpt_cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=64,
                         resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    policy = GPT2LMHeadModel(gpt_cfg)
    backbone = GPT2Model(gpt_cfg)
    backbone.load_state_dict(policy.transformer.state_dict())
    value = ValueModel(backbone)

    # the same global rollout batch on every rank, from the initial policy
    prompts = ["the film was", "the plot", "acting was very", "not", "the score was", "fun but", "boring", "great"]
    full = generate(policy, tokenizer, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        old_logprobs = sequence_logprobs(policy, full.query_ids, full.query_mask, full.response_ids,
                                         full.response_mask)
        old_values = response_values(value, full.query_ids, full.query_mask, full.response_ids, full.response_mask)
        rewards = torch.zeros_like(old_logprobs)
        score = torch.linspace(-1, 1, BATCH)
        rewards[torch.arange(BATCH), full.response_mask.sum(-1) - 1] = score
        advantages, returns = gae(rewards, old_values[0], full.response_mask, 1.0, 0.95)
        reference = GPT2LMHeadModel(gpt_cfg)
        reference.load_state_dict(policy.state_dict())
        # a reference a little away from the policy, so the KL term of the GRPO loss is not zero
        for param in reference.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
        ref_logprobs = sequence_logprobs(reference, full.query_ids, full.query_mask, full.response_ids,
                                         full.response_mask)
        group_adv = group_advantages(score, 4)

    per = BATCH // world
    rows = torch.arange(rank * per, (rank + 1) * per)
    mine = full.select(rows)
    advantages_local = dist.global_whiten(advantages[rows], mine.response_mask)

    engine_cfg = ds_config(zero_stage=stage, micro_batch_per_rank=per, world_size=world, max_grad_norm=1.0)
    policy_engine = train_engine(policy, lr=1e-3, total_steps=10, final_ratio=1.0, config=engine_cfg)
    value_engine = train_engine(value, lr=1e-3, total_steps=10, final_ratio=1.0, config=engine_cfg)
    counts = dist.all_gather_cat(torch.tensor([local_parameter_count(policy_engine.module)]))
    # parameters ZeRO-3 keeps whole on every rank (below its persistence threshold)
    persistent = sum(p.ds_numel for p in policy_engine.module.parameters() if getattr(p, "ds_persist", False))
    if mode == "ppo":
        stats = ppo_update(policy_engine, value_engine, mine, old_logprobs=old_logprobs[rows],
                           old_values=old_values[:, rows], returns=returns[rows][None],
                           advantages_for=lambda idx: advantages_local[idx], epochs=2, micro_batch=per,
                           clip_range=0.2, clip_range_value=0.2, vf_coef=0.5, temperature=1.0,
                           generator=step_generator(0, 0, 1), step=0)
    else:
        stats = group_update(policy_engine, mine, old_logprobs=old_logprobs[rows], ref_logprobs=ref_logprobs[rows],
                             advantages=group_adv[rows], epochs=2, micro_batch=per, clip_range=0.2, temperature=1.0,
                             kl_coef=0.1, loss_normalization=mode.split("-")[1], max_new_tokens=6,
                             generator=step_generator(0, 0, 1), step=0)
    with gathered(policy_engine.module, stage):
        params = {k: v.detach().clone() for k, v in policy_engine.module.named_parameters()}
    with gathered(value_engine.module, stage):
        params.update({f"value.{k}": v.detach().clone() for k, v in value_engine.module.named_parameters()})
    if info.is_main:
        torch.save({"params": params, "local_params": counts.tolist(), "persistent_params": persistent,
                    "total_params": sum(p.numel() for n, p in params.items() if not n.startswith("value."))}, out)
        print(json.dumps({"world": world, "stage": stage, "local_params": counts.tolist(), "stats": stats}))
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
