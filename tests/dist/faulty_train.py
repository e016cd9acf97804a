"""launch/train.py with one fault injected, for the reliability tests.

    python tests/dist/faulty_train.py FAULT CALL -- <launch/train.py arguments>

FAULT is one of: gold_nan, gold_inf, proxy_inf, proxy_nan, loss_nan. CALL is the 1-based call of
the faulty function that returns the bad value (earlier calls are untouched), so the fault lands at
a later step of the run, after checkpoints were written.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

import torch  # noqa: E402

FAULTS = ("gold_nan", "gold_inf", "proxy_inf", "proxy_nan", "loss_nan")


def main() -> int:
    fault, call = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1:]
    if fault not in FAULTS:
        raise SystemExit(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
    value = float("inf") if fault.endswith("inf") else float("nan")
    calls = {"n": 0}

    def poisoned(real):
        def wrapper(*a, **k):
            out = real(*a, **k)
            calls["n"] += 1
            if calls["n"] == call:
                out = out.clone()
                out.view(-1)[0] = value
            return out
        return wrapper

    if fault.startswith("gold"):
        from rlhf_overopt.rewards.gold import GoldScorer

        GoldScorer.score = poisoned(GoldScorer.score)
    elif fault.startswith("proxy"):
        from rlhf_overopt.rewards.ensemble import ProxyEnsemble

        ProxyEnsemble.score_texts = poisoned(ProxyEnsemble.score_texts)
    else:
        import rlhf_overopt.update as update

        real = update.clipped_surrogate

        def surrogate(*a, **k):
            per_token, stats = real(*a, **k)
            calls["n"] += 1
            if calls["n"] == call:
                per_token = per_token + torch.tensor(value)
            return per_token, stats

        update.clipped_surrogate = surrogate
    import train

    return train.main(args)


if __name__ == "__main__":
    sys.exit(main())
