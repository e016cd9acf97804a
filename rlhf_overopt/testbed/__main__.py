"""`python -m rlhf_overopt.testbed [--seed N] [--quiet] [key=value ...]`: build or find the testbed.

Overrides name TestbedConfig fields, with or without the `testbed.` prefix
(`n_reviews=2000` or `testbed.n_reviews=2000`); they are checked like any config override.
Prints where the testbed is and a summary of its manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from rlhf_overopt.config.load import load_config
from rlhf_overopt.errors import ConfigError
from rlhf_overopt.testbed.build import build_testbed


def summary(manifest: dict[str, Any]) -> str:
    """A short human-readable digest of a testbed manifest."""
    s, sft, g, p = manifest["sizes"], manifest["sft"], manifest["sft_gold_on_eval"], manifest["preferences"]
    times = ", ".join(f"{k} {v['wall_s']:.1f}s" for k, v in manifest["timings"].items())
    q = g["quantiles"]
    lines = [
        (f"corpus: {s['corpus_reviews']} reviews, {s['corpus_words']} words; vocab {s['vocab_size']}; "
         f"policy {s['policy_parameters']:,} parameters"),
        (f"prompts: {s['train_prompts']} train ({s['distinct_train_prompts']} distinct), "
         f"{s['eval_prompts']} eval ({s['distinct_eval_prompts']} distinct)"),
        (f"SFT held-out loss {sft['heldout_loss']:.3f} nats/token vs unigram {sft['unigram_loss']:.3f} "
         f"({sft['epochs']:.2f} epochs)"),
        (f"SFT gold on eval prompts: mean {g['mean']:.3f} std {g['std']:.3f} "
         f"q05/q50/q95 {q['q05']:.3f}/{q['q50']:.3f}/{q['q95']:.3f}; EOS rate {g['eos_rate']:.3f}; "
         f"mean {g['mean_words']:.1f} words ({g['mean_tokens']:.1f} tokens); "
         f"outside length band {g['length_out_of_band_rate']:.3f}"),
        (f"preferences: {p['n_pairs']} pairs ({p['n_ties_dropped']} ties dropped), "
         f"flipped {p['flipped_fraction']:.3f}, agreement with clean gold {p['clean_agreement']:.3f}; "
         f"pairs differing in EOS {p['pairs_eos_differs_fraction']:.3f}"),
        f"build time: {times}",
        "samples:",
    ]
    for sample in manifest["samples"]:
        lines.append(f"  [{sample['gold']:+.3f}{'' if sample['ended'] else ', no EOS'}] "
                     f"{json.dumps(sample['prompt'] + sample['response'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_overopt.testbed", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="testbed seed (same as seed=N)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage logs")
    parser.add_argument("overrides", nargs="*", help="TestbedConfig fields as key=value")
    args = parser.parse_args(argv)
    overrides = [o if o.startswith("testbed.") else f"testbed.{o}" for o in args.overrides]
    if args.seed is not None:
        overrides.append(f"testbed.seed={args.seed}")
    try:
        # Checked as a build_testbed run: settings of other methods cannot refuse the testbed.
        cfg = load_config(None, ["method=build_testbed", *overrides]).testbed
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    testbed = build_testbed(cfg, progress=not args.quiet)
    print(f"testbed: {testbed.root}")
    print(summary(testbed.manifest()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
