"""What a tokenizer's vocabulary costs and buys for ``lfm2-tiny``: one column per tokenizer dir.

    pip install -e ".[tokenizer]"                      # wordfreq: the English word list
    python scripts/tokenizer_report.py                 # the bundled tokenizer
    python scripts/tokenizer_report.py DIR [DIR ...]   # e.g. candidates of build_tokenizer.py --out
    python scripts/tokenizer_report.py DIR ... --default-job   # + the default job with each

Rows: vocabulary size; lfm2-tiny's embedding rows (the vocabulary rounded up to a multiple of 64)
and parameters (``conf/model/lfm2-tiny.yaml``: hidden 192, tied input/output embeddings, so the
vocabulary costs rows x 192 once); tokens per word on ``wordfreq``'s 5000 most frequent English
words (as in running text, ``" word"``: mean, frequency-weighted mean, share in one and in at
most two tokens) and on the sentences of :data:`SENTENCES`; "government"; the bundled tasks'
pieces that are not one token and the mean tokens of a default-job SFT example; UTF-8
round-trip of :data:`ROUND_TRIP`. ``--default-job`` runs ``python -m ptlight
model.tokenizer=DIR`` once per dir in a fresh process (SFT then DPO on the sort task), timing
the whole process, and adds its gold table (reward / exact match after SFT and after DPO).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "ptlight" / "assets" / "lfm2-tiny-tokenizer"
SENTENCES = (
    "The government announced a new policy on education and health care this week.",
    "She walked to the station because the buses were not running after the storm.",
    "Please write a short summary of the meeting and send it to everyone before Friday.",
    "Scientists believe that the ancient river once flowed through the middle of the valley.",
    "If you reverse the order of these words, the sentence will no longer make sense.",
    "My brother bought a second-hand bicycle, but the brakes need to be repaired.",
)
ROUND_TRIP = ("naïve café — Zürich, São Paulo, 東京都, 한국어, Ελληνικά, русский, 😀👍🏽, "
              "tab\tnew\nline, emoji 🧪, \x00 \u200b ﬁ")


def _words_and_freqs(n: int) -> tuple[list[str], list[float]]:
    import wordfreq  # pip install -e ".[tokenizer]"

    words = wordfreq.top_n_list("en", n)
    return words, [wordfreq.word_frequency(w, "en") for w in words]


def _model_params(tok_dir: Path) -> tuple[int, int, int, bool]:
    """(embedding rows, embedding params, total params, tied) of lfm2-tiny with that tokenizer."""
    from omegaconf import OmegaConf

    from ptlight.model.backbone import build_policy, load_tokenizer

    cfg = OmegaConf.load(REPO / "conf" / "model" / "lfm2-tiny.yaml")
    cfg.tokenizer = str(tok_dir)
    model = build_policy(cfg, load_tokenizer(cfg))
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    total = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
    return emb.shape[0], emb.numel(), total, tied


def _sft_tokens(tok) -> float:
    """Mean tokens of a default-job SFT example (prompt and completion with the chat template)."""
    from ptlight.tasks import sort

    rows = sort.make_rows("sft", 500, 0, "train", lazy_prob=0.6)
    texts = [tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return sum(lengths) / len(lengths)


def _step_times(tok_dir: Path, steps: int = 8) -> tuple[float, float]:
    """CPU seconds (one thread, fastest after a warm-up) of an SFT step of lfm2-tiny on a batch
    of 32 default-job examples (forward, backward, AdamW) and of greedy generation of 16 new
    tokens for 32 prompts. CPU time of one thread moves less than wall time on a shared machine."""
    import torch
    from omegaconf import OmegaConf

    from ptlight.model.backbone import build_policy, load_tokenizer
    from ptlight.tasks import sort

    torch.set_num_threads(1)
    cfg = OmegaConf.load(REPO / "conf" / "model" / "lfm2-tiny.yaml")
    cfg.tokenizer = str(tok_dir)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_policy(cfg, tok)
    rows = sort.make_rows("sft", 32, 0, "train", lazy_prob=0.6)
    texts = [tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        t0 = time.process_time()
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.process_time() - t0)
    prompts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
               for r in rows]
    tok.padding_side = "left"
    enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    gen = []
    with torch.no_grad():
        for _ in range(3):
            t0 = time.process_time()
            model.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           pad_token_id=tok.pad_token_id)
            gen.append(time.process_time() - t0)
    return min(times[1:]), min(gen)


def tokenizer_figures(tok_dir: Path) -> dict[str, str]:
    sys.path.insert(0, str(REPO / "scripts"))
    from transformers import AutoTokenizer

    from build_tokenizer import task_pieces

    tok = AutoTokenizer.from_pretrained(tok_dir)

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    words, freqs = _words_and_freqs(5000)
    counts = [n(" " + w) for w in words]
    bare = [n(w) for w in words]
    words_in_sentences = sum(len(s.split()) for s in SENTENCES)
    split = [p for p in task_pieces() if n(p) != 1]
    rows, emb, total, tied = _model_params(tok_dir)
    step, gen = _step_times(tok_dir)
    ok = all(tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t
             for t in (ROUND_TRIP, *SENTENCES))
    return {
        "vocabulary (tokens)": f"{len(tok)}",
        "lfm2-tiny embedding rows (x64)": f"{rows}",
        "embedding parameters (hidden 192" + (", tied)" if tied else ", untied)"):
            f"{emb / 1e6:.3f} M",
        "lfm2-tiny parameters": f"{total / 1e6:.3f} M",
        "SFT step, batch 32 (CPU s, 1 thread)": f"{step:.3f}",
        "greedy generation, 32 x 16 tokens (CPU s, 1 thread)": f"{gen:.3f}",
        "tokens/word, top 5000 English words": f"{sum(counts) / len(counts):.2f}",
        "tokens/word, frequency-weighted": f"{sum(c * f for c, f in zip(counts, freqs)) / sum(freqs):.2f}",
        "top 5000 in 1 token": f"{sum(c == 1 for c in counts) / len(counts):.1%}",
        "top 5000 in <= 2 tokens": f"{sum(c <= 2 for c in counts) / len(counts):.1%}",
        "tokens/word, top 5000 at a line start (no space)": f"{sum(bare) / len(bare):.2f}",
        "tokens/word, sample sentences": f"{sum(map(n, SENTENCES)) / words_in_sentences:.2f}",
        '" government" / "government" tokens': f"{n(' government')} / {n('government')}",
        "bundled-task pieces not one token": f"{len(split)} of {len(task_pieces())}",
        "tokens per default-job SFT example": f"{_sft_tokens(tok):.1f}",
        "UTF-8 round trip": "exact" if ok else "LOSSY",
    }


def default_job(tok_dir: Path) -> dict[str, str]:
    """``python -m ptlight model.tokenizer=DIR`` in a fresh process: wall time and gold table."""
    run_dir = REPO / "outputs" / f"tokreport-{tok_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "ptlight", f"model.tokenizer={tok_dir}",
                           f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        sys.exit(f"default job with {tok_dir} failed:\n{proc.stderr[-3000:]}")
    stages = {s["stage"]: s for s in json.loads((run_dir / "pipeline.json").read_text())}
    out = {"default job wall s (whole process)": f"{wall:.0f}"}
    for name, s in stages.items():
        a = s["after"]
        out[f"after {name}: gold reward / exact"] = f"{a['gold/reward']:.3f} / {a['gold/exact']:.3f}"
        out[f"{name} stage wall s"] = f"{s['wall_time_s']:.0f}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="*", type=Path, default=[BUNDLED])
    ap.add_argument("--default-job", action="store_true",
                    help="also run the default job with each tokenizer (minutes each)")
    args = ap.parse_args()
    columns = []
    for d in args.dirs:
        figures = tokenizer_figures(d.resolve())
        if args.default_job:
            figures |= default_job(d.resolve())
        columns.append(figures)
    keys = list(dict.fromkeys(k for c in columns for k in c))
    names = [str(d) if d.resolve() != BUNDLED else "bundled" for d in args.dirs]
    print("| figure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in keys:
        print(f"| {k} | " + " | ".join(c.get(k, "") for c in columns) + " |")


if __name__ == "__main__":
    main()
