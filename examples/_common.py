"""Shared pieces of the examples: command line, tiny random-weight models built from configs (nothing
is downloaded), synthetic data, and the loss-curve printout and plot.

Every example prints one line per optimizer step, ``step <i> loss <value> [<name> <value> ...]``,
then ``plot: <path>`` (or one line saying the plot was skipped when matplotlib is missing).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # before torch, which imports tqdm (read at import time)

import torch  # noqa: E402


def parse_args(description: str, steps: int) -> argparse.Namespace:
    """``--steps N`` (optimizer steps) and ``--out DIR`` (where the plot goes)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    parser.add_argument("--out", default=None, help="output directory (default: examples_out/<script name>)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def output_dir(args: argparse.Namespace, name: str) -> str:
    path = args.out or os.path.join("examples_out", name)
    os.makedirs(path, exist_ok=True)
    return path


def quiet() -> None:
    """Silences the warnings and progress bars of transformers / datasets / sentence-transformers,
    and runs torch on one thread (the models are tiny: more threads only add synchronisation)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def print_step(step: int, loss: float, **parts: float) -> None:
    extra = "".join(f" {name} {value:.6f}" for name, value in parts.items())
    print(f"step {step} loss {loss:.6f}{extra}", flush=True)


def report(curves: dict[str, list[float]], out: str, title: str, filename: str = "loss.png") -> None:
    """Prints a one-line summary of each curve and plots them all (skipped without matplotlib)."""
    for name, values in curves.items():
        finite = all(math.isfinite(v) for v in values)
        print(f"{name}: {values[0]:.4f} -> {values[-1]:.4f} over {len(values)} steps"
              f"{'' if finite else ' (non-finite values!)'}", flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'kdloss[examples]')", flush=True)
        return
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name, values in curves.items():
        axis.plot(range(1, len(values) + 1), values, label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    path = os.path.join(out, filename)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    print(f"plot: {path}", flush=True)


def trainer_curves(log_history: list[dict], keys=("loss", "kd_loss", "ce_loss")) -> dict[str, list[float]]:
    """The per-step values of ``keys`` logged by a Trainer with ``logging_steps=1``."""
    rows = [row for row in log_history if "loss" in row and "step" in row]
    return {key: [row[key] for row in rows] for key in keys if rows and key in rows[0]}


def print_trainer_log(log_history: list[dict], keys=("loss", "kd_loss", "ce_loss")) -> dict[str, list[float]]:
    curves = trainer_curves(log_history, keys)
    rows = [row for row in log_history if "loss" in row and "step" in row]
    for row in rows:
        print_step(row["step"], row["loss"], **{k: row[k] for k in keys[1:] if k in row})
    return curves


def silent_trainer(trainer) -> None:
    """Removes the Trainer's own printing (we print the curve ourselves)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


# ---------------------------------------------------------------- tiny causal LMs


def tiny_llama(vocab: int, hidden: int, layers: int, seed: int, *, init: float = 0.02, tie: bool = False):
    """A random-weight Llama built from a config (GQA: 4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, initializer_range=init, tie_word_embeddings=tie,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab: int, hidden: int, layers: int, seed: int, *, init: float = 0.02):
    """A random-weight GPT-2 (tied input/output embeddings, no dropout) built from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=hidden, n_layer=layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=init,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config)


def token_sequences(count: int, vocab: int, seed: int, *, min_len: int = 12, max_len: int = 24,
                    prompt: int = 4) -> list[dict]:
    """Synthetic "documents": each repeats a random motif of 3–5 tokens with noise, so that
    models can learn something. ``labels`` are ``-100`` on the first ``prompt`` tokens (a prompt
    that is not trained on), the token ids elsewhere (unshifted, as Hugging Face expects)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        motif = torch.randint(3, vocab, (int(torch.randint(3, 6, (1,), generator=generator)),), generator=generator)
        ids = motif.repeat(length // len(motif) + 1)[:length].clone()
        noise = torch.rand(length, generator=generator) < 0.15
        ids[noise] = torch.randint(3, vocab, (int(noise.sum()),), generator=generator)
        labels = ids.clone()
        labels[:prompt] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


# ---------------------------------------------------------------- tiny sentence-transformers models

WORDS = [f"w{i}" for i in range(60)]


def _tiny_bert_dir(hidden: int, layers: int, seed: int, *, num_labels: int | None) -> str:
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    path = tempfile.mkdtemp(prefix="kdloss_tiny_bert_")
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as handle:
        handle.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    BertTokenizerFast(vocab_file).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    if num_labels is None:
        BertModel(config).save_pretrained(path)
    else:
        config.num_labels = num_labels
        config.id2label, config.label2id = {0: "score"}, {"score": 0}
        BertForSequenceClassification(config).save_pretrained(path)
    return path


def tiny_sentence_transformer(hidden: int, layers: int, seed: int):
    """A random-weight BERT bi-encoder (mean pooling) saved to a temporary folder and loaded."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(_tiny_bert_dir(hidden, layers, seed, num_labels=None), device="cpu")


def tiny_cross_encoder(hidden: int, layers: int, seed: int):
    """A random-weight one-label BERT cross-encoder saved to a temporary folder and loaded."""
    from sentence_transformers.cross_encoder import CrossEncoder

    return CrossEncoder(_tiny_bert_dir(hidden, layers, seed, num_labels=1), device="cpu")


def sentences(count: int, seed: int, *, min_words: int = 2, max_words: int = 8) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(min_words, max_words + 1, (1,), generator=generator))
        out.append(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator)))
    return out
