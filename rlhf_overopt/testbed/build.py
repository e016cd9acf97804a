"""Build (or reuse) the embedded testbed: corpus, tokenizer, SFT policy, prompts, preferences.

The testbed is a content-addressed cache entry: `<cache_dir>/testbed-<hash>`, where the hash
covers every TestbedConfig field except `cache_dir`, plus `TESTBED_VERSION`. A build happens at
most once per hash on a machine:

- a finished testbed is recognised by its `manifest.json` alone (a reuse takes milliseconds);
- a build runs in a temporary sibling folder that is `os.replace`d into place at the end, so a
  killed build never leaves a half testbed behind (its leftovers are removed by the next build);
- an exclusive `fcntl.flock` on a per-hash lock file serializes builders: a second process (two
  DeepSpeed ranks, parallel sweep runs) waits for the first and then reuses its result.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import datasets
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from rlhf_overopt.config.sections import TestbedConfig
from rlhf_overopt.run.progress import quiet_datasets
from rlhf_overopt.testbed.corpus import generate_reviews
from rlhf_overopt.testbed.data import (
    PREFS_STATS_FILE,
    make_preferences,
    make_prompts,
    sample_responses,
    save_json,
)
from rlhf_overopt.testbed.gold import TestbedGold, response_length
from rlhf_overopt.testbed.sft import METRICS_FILE, quiet_transformers, torch_threads, train_sft_policy
from rlhf_overopt.testbed.tokenizer import load_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

TESTBED_VERSION = "1"
"""Bumped whenever a change to this package changes what a build produces; part of the hash."""
CACHE_ENV = "RLHF_OVEROPT_CACHE"
"""Environment variable naming the cache root when `TestbedConfig.cache_dir` is empty."""
N_MANIFEST_SAMPLES = 6
"""Eval prompts whose SFT responses are shown in the manifest."""

T = TypeVar("T")


@dataclass(frozen=True)
class Testbed:
    """Paths of a finished testbed, with loaders for each artifact."""

    __test__ = False  # not a pytest class despite the name

    root: Path
    """The testbed folder, `<cache_dir>/testbed-<hash>`."""
    tokenizer_dir: Path
    """Byte-level BPE tokenizer (`save_pretrained` format)."""
    policy_dir: Path
    """SFT policy: GPT-2 safetensors, config, tokenizer and `sft_metrics.json`."""
    prompts_dir: Path
    """`datasets.DatasetDict` with splits train and eval, columns prompt_id, prompt, reference."""
    prefs_dir: Path
    """`datasets.Dataset` of gold-labelled pairs plus `pairs_clean_agreement.json`."""
    corpus_path: Path
    """The generated reviews, one per line."""
    manifest_path: Path
    """`manifest.json`: config, artifact hashes, sizes, timings, quality numbers, samples."""

    @classmethod
    def at(cls, root: str | Path) -> Testbed:
        """The testbed layout under `root` (nothing is checked or read)."""
        r = Path(root)
        return cls(root=r, tokenizer_dir=r / "tokenizer", policy_dir=r / "policy", prompts_dir=r / "prompts",
                   prefs_dir=r / "prefs", corpus_path=r / "corpus.txt", manifest_path=r / "manifest.json")

    def load_tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer (EOS "<|endoftext|>", PAD "<|pad|>", left padding)."""
        return load_tokenizer(self.tokenizer_dir)

    def load_policy(self, device: str | torch.device = "cpu") -> GPT2LMHeadModel:
        """The SFT policy in eval mode, float32, dropout 0."""
        with quiet_transformers():
            model = GPT2LMHeadModel.from_pretrained(str(self.policy_dir), use_safetensors=True, dtype=torch.float32)
        return model.to(device).eval()

    def load_prompts(self) -> datasets.DatasetDict:
        """Prompt splits "train" and "eval" (disjoint prompt strings)."""
        return datasets.load_from_disk(str(self.prompts_dir))

    def load_prefs(self) -> datasets.Dataset:
        """The preference dataset; columns in `rlhf_overopt.testbed.data.PREF_COLUMNS`."""
        return datasets.load_from_disk(str(self.prefs_dir))

    def load_corpus(self) -> list[str]:
        """The corpus reviews."""
        return self.corpus_path.read_text(encoding="utf-8").splitlines()

    def manifest(self) -> dict[str, Any]:
        """The parsed manifest.json."""
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def config(self) -> TestbedConfig:
        """The TestbedConfig this testbed was built from (with the cache_dir it was built under)."""
        return TestbedConfig(**self.manifest()["config"])


# -- cache keys ------------------------------------------------------------------------------------


def resolve_cache_dir(cfg: TestbedConfig) -> Path:
    """`cfg.cache_dir`, else $RLHF_OVEROPT_CACHE, else ~/.cache/rlhf_overopt."""
    raw = cfg.cache_dir or os.environ.get(CACHE_ENV, "") or "~/.cache/rlhf_overopt"
    return Path(raw).expanduser().resolve()


def config_hash(cfg: TestbedConfig) -> str:
    """sha256 (hex) of every field but cache_dir, plus TESTBED_VERSION: the testbed's identity."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}
    blob = json.dumps({"version": TESTBED_VERSION, "config": fields}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def resolve_root(cfg: TestbedConfig) -> Path:
    """Where the testbed of `cfg` lives (or will live)."""
    return resolve_cache_dir(cfg) / f"testbed-{config_hash(cfg)[:16]}"


def stage_seed(seed: int, stage: str) -> int:
    """An independent 31-bit seed for one stage, so stages never share a random stream."""
    digest = hashlib.sha256(f"{seed}/{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def file_hashes(root: Path, exclude: tuple[str, ...] = ("manifest.json",)) -> dict[str, str]:
    """sha256 of every file under `root` by relative posix path, sorted; `exclude` names skipped."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[rel] = h.hexdigest()
    return out


# -- building --------------------------------------------------------------------------------------


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path`; log when another process holds it and we wait."""
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is building this testbed; waiting for %s", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_testbed(cfg: TestbedConfig, progress: bool = True) -> Testbed:
    """The testbed of `cfg`: reused from the cache when present, else built (once per machine).

    See the module docstring for the caching, atomicity and locking rules.
    """
    root = resolve_root(cfg)
    testbed = Testbed.at(root)
    if testbed.manifest_path.is_file():
        return testbed
    cache = root.parent
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache / f".{root.name}.lock"):
        if testbed.manifest_path.is_file():  # another process finished it while we waited
            return testbed
        for stale in cache.glob(f".{root.name}.tmp-*"):  # leftovers of a killed build
            shutil.rmtree(stale, ignore_errors=True)
        if root.exists():  # a folder without a manifest is not a testbed we made
            shutil.rmtree(root)
        tmp = cache / f".{root.name}.tmp-{os.getpid()}"
        try:
            with torch_threads(cfg.num_threads):
                _build_into(tmp, cfg, progress)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return testbed


def _timed(timings: dict[str, dict[str, float]], name: str, fn: Callable[[], T]) -> T:
    """Run one stage, record wall and CPU seconds (the CPU time is robust to a busy machine)."""
    logger.info("testbed: %s ...", name)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    timings[name] = {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}
    logger.info("testbed: %s done in %.1f s", name, timings[name]["wall_s"])
    return result


def _build_into(folder: Path, cfg: TestbedConfig, progress: bool) -> None:
    """Build every artifact and the manifest into `folder` (which must not exist yet)."""
    folder.mkdir(parents=True)
    tb = Testbed.at(folder)
    timings: dict[str, dict[str, float]] = {}
    started = time.perf_counter()

    # 1. corpus
    def corpus() -> list[str]:
        reviews = generate_reviews(cfg.n_reviews, stage_seed(cfg.seed, "corpus"))
        tb.corpus_path.write_text("\n".join(reviews) + "\n", encoding="utf-8")
        return reviews

    reviews = _timed(timings, "corpus", corpus)

    # 2. tokenizer
    tokenizer = _timed(timings, "tokenizer", lambda: train_tokenizer(reviews, cfg.vocab_size, tb.tokenizer_dir))

    # 3. SFT policy (seeded by cfg.seed itself: a pretrain ensemble uses cfg.seed + i)
    _timed(timings, "sft", lambda: train_sft_policy(reviews, tokenizer, cfg, cfg.seed, tb.policy_dir, progress))
    sft_metrics = json.loads((tb.policy_dir / METRICS_FILE).read_text())

    # 4. prompts
    def prompts() -> datasets.DatasetDict:
        dd = make_prompts(cfg.n_train_prompts, cfg.n_eval_prompts, cfg.prompt_words, stage_seed(cfg.seed, "prompts"))
        longest = max(len(ids) for ids in tokenizer(list(dd["train"]["prompt"]) + list(dd["eval"]["prompt"]))["input_ids"])
        if longest + cfg.max_new_tokens > cfg.n_positions:
            raise ValueError(f"testbed: a prompt of {longest} tokens plus max_new_tokens={cfg.max_new_tokens} "
                             f"exceeds n_positions={cfg.n_positions}")
        with quiet_datasets():
            dd.save_to_disk(str(tb.prompts_dir))
        return dd

    prompt_splits = _timed(timings, "prompts", prompts)

    # 5. preference dataset labelled by gold (with label noise)
    policy = tb.load_policy()
    gold = TestbedGold.from_config(cfg)

    def prefs() -> dict:
        ds, stats = make_preferences(policy, tokenizer, prompt_splits["train"], gold, cfg,
                                     stage_seed(cfg.seed, "prefs"), progress)
        with quiet_datasets():
            ds.save_to_disk(str(tb.prefs_dir))
        save_json(tb.prefs_dir / PREFS_STATS_FILE, stats)
        return stats

    pref_stats = _timed(timings, "preferences", prefs)

    # 6. gold distribution of the SFT policy on the eval prompts
    def eval_stats() -> tuple[dict, list[dict]]:
        eval_prompts = list(prompt_splits["eval"]["prompt"])
        samples = sample_responses(policy, tokenizer, eval_prompts, cfg.max_new_tokens, cfg.gen_batch_size,
                                   stage_seed(cfg.seed, "eval"), progress, desc="eval samples")
        return gold_distribution(gold, eval_prompts, samples.responses, samples.ended,
                                 [len(r) for r in samples.response_ids]), [
            {"prompt": p, "response": r, "ended": e, "gold": g}
            for p, r, e, g in zip(eval_prompts[:N_MANIFEST_SAMPLES], samples.responses, samples.ended,
                                  gold.score(eval_prompts[:N_MANIFEST_SAMPLES],
                                             samples.responses[:N_MANIFEST_SAMPLES],
                                             samples.ended[:N_MANIFEST_SAMPLES]).tolist())
        ]

    sft_gold, samples = _timed(timings, "eval_stats", eval_stats)

    # 7. manifest (written last: its presence marks a finished testbed)
    hashes = file_hashes(folder)
    manifest = {
        "testbed_version": TESTBED_VERSION,
        "config_hash": config_hash(cfg),
        "config": dataclasses.asdict(cfg),
        "hashes": hashes,
        "artifacts_sha256": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest(),
        "sizes": {
            "corpus_reviews": len(reviews),
            "corpus_words": sum(len(r.split()) for r in reviews),
            "vocab_size": len(tokenizer),
            "policy_parameters": sum(p.numel() for p in policy.parameters()),
            "train_prompts": len(prompt_splits["train"]),
            "eval_prompts": len(prompt_splits["eval"]),
            "distinct_train_prompts": len(set(prompt_splits["train"]["prompt"])),
            "distinct_eval_prompts": len(set(prompt_splits["eval"]["prompt"])),
            "preference_pairs": pref_stats["n_pairs"],
        },
        "sft": sft_metrics,
        "sft_gold_on_eval": sft_gold,
        "preferences": pref_stats,
        "samples": samples,
        "timings": {**timings, "total": {"wall_s": round(time.perf_counter() - started, 3)}},
        "library_versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                             "tokenizers": _version("tokenizers"), "datasets": datasets.__version__},
    }
    save_json(tb.manifest_path, manifest)
    logger.info("testbed built in %.1f s: SFT held-out loss %.3f (unigram %.3f), SFT gold %.3f, "
                "label agreement %.3f", manifest["timings"]["total"]["wall_s"], sft_metrics["heldout_loss"],
                sft_metrics["unigram_loss"], sft_gold["mean"], pref_stats["clean_agreement"])


def gold_distribution(gold: TestbedGold, prompts: list[str], responses: list[str], ended: list[bool],
                      n_tokens: list[int]) -> dict[str, Any]:
    """Mean, std, quantiles of gold, EOS rate, lengths and mean gold terms of a set of responses."""
    parts = gold.components(prompts, responses, ended)
    score = gold.score(prompts, responses, ended)
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    quantiles = torch.quantile(score.double(), qs.double()).tolist() if score.numel() else [math.nan] * 5
    words = [response_length(r) for r in responses]
    return {
        "n": len(responses),
        "mean": float(score.mean()),
        "std": float(score.std()) if score.numel() > 1 else 0.0,
        "quantiles": {f"q{round(q * 100):02d}": v for q, v in zip(qs.tolist(), quantiles)},
        "eos_rate": sum(ended) / max(1, len(ended)),
        "mean_words": sum(words) / max(1, len(words)),
        "max_words": max(words, default=0),
        "mean_tokens": sum(n_tokens) / max(1, len(n_tokens)),
        "length_out_of_band_rate": float((parts["length"] < 0).float().mean()),
        "component_means": {k: float(v.mean()) for k, v in parts.items()},
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
