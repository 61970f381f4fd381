"""kdloss.integrations: Hugging Face Trainer distillation and sentence-transformers losses.

Tiny random-weight models built from configs (no downloads). The reference everywhere is the
gradient of one global mean over all counted tokens of the optimizer step, computed in one process
with one call on the whole batch.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import datasets
import pytest
import torch
import torch.multiprocessing as mp
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from kdloss.functional import topk_kl_loss
from kdloss.integrations.transformers import (
    DistillationCollator,
    DistillationConfig,
    KDTrainer,
    distillation_loss,
    shifted_labels,
    unwrap_model,
)
from kdloss.sparse import topk_teacher

from helpers import free_port

warnings.filterwarnings("ignore", message=".*bos_token_id.*")
VOCAB = 64


# ------------------------------------------------------------------ tiny models and data


def tiny_lm(arch: str, seed: int, *, tie: bool | None = None, hidden: int = 16):
    torch.manual_seed(seed)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=hidden, n_layer=1, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                          eos_token_id=2, tie_word_embeddings=True if tie is None else tie))
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True if tie is None else tie))
    return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False if tie is None else tie))


def token_rows(count: int = 4, length: int = 10, seed: int = 0, stored_k: int | None = None, teacher=None):
    """Rows with very uneven counted tokens: every other row ignores 7 of its 10 labels (a
    per-micro-batch mean would differ from the global mean); position 0 is counted in the labels
    (as Trainer would count it for GPT-2) but never predicted."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        ids = torch.randint(3, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[1:8] = -100 if i % 2 else labels[1:8]
        row = {"input_ids": ids.tolist(), "labels": labels.tolist()}
        if stored_k is not None:
            with torch.no_grad():
                ids_k, logprobs = topk_teacher(teacher(input_ids=ids[None]).logits[0], stored_k)
            row["teacher_ids"], row["teacher_values"] = ids_k.tolist(), logprobs.tolist()
        rows.append(row)
    return rows


class GradientGrab(TrainerCallback):
    """The accumulated gradient of the step, just before the optimizer uses it."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def training_args(**overrides) -> TrainingArguments:
    options = dict(output_dir=tempfile.mkdtemp(prefix="kdloss_test_"), per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, max_steps=1, learning_rate=0.0, max_grad_norm=0.0,
                   logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    options.update(overrides)
    return TrainingArguments(**options)


def quiet(trainer):
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def reference_gradients(student, rows, config, teacher=None):
    """Loss and gradients of the global mean over all rows, one call, one process."""
    return reference_gradients_of_batch(student, DistillationCollator()(rows), config, teacher)


def reference_gradients_of_batch(student, batch, config, teacher=None):
    student.zero_grad(set_to_none=True)
    loss = distillation_loss(student, batch, teacher_model=teacher, config=config)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return loss.item(), grads


def assert_same_gradients(actual: dict, expected: dict, rtol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    scale = max(float(g.abs().max()) for g in expected.values())
    assert scale > 0
    for name, grad in expected.items():
        error = float((actual[name] - grad).abs().max())
        assert error <= rtol * scale, f"{name}: max |diff| {error:.3e} (gradient scale {scale:.3e})"


def logged(trainer, key: str = "loss") -> float:
    return [row for row in trainer.state.log_history if "loss" in row][0][key]


# ------------------------------------------------------------------ Trainer: accumulation, heads, teachers


@pytest.mark.parametrize("arch,fused,online", [("llama", False, True), ("llama", True, True),
                                                ("gpt2", False, False), ("gpt2", True, False)])
def test_kdtrainer_accumulation_equals_global_mean(arch, fused, online):
    teacher = tiny_lm("llama", seed=1)
    rows = token_rows(stored_k=None if online else 8, teacher=teacher)
    config = DistillationConfig(temperature=2.0, top_k=8, fused=fused, ce_weight=0.25)
    expected_loss, expected = reference_gradients(tiny_lm(arch, seed=0), rows, config, teacher if online else None)

    grab = GradientGrab()
    trainer = quiet(KDTrainer(model=tiny_lm(arch, seed=0), args=training_args(),
                              train_dataset=datasets.Dataset.from_list(rows), callbacks=[grab],
                              teacher_model=teacher if online else None, distillation=config))
    trainer.train()
    assert_same_gradients(grab.grads, expected)
    assert logged(trainer) == pytest.approx(expected_loss, rel=1e-5)
    # the two terms are logged separately and mix as (1 - w)·KD + w·CE
    mixed = 0.75 * logged(trainer, "kd_loss") + 0.25 * logged(trainer, "ce_loss")
    assert mixed == pytest.approx(logged(trainer), rel=1e-5)
    assert logged(trainer, "kd_loss") != pytest.approx(logged(trainer, "ce_loss"), rel=1e-3)


def test_kdtrainer_trains_from_a_kdloss_cache(tmp_path):
    """Stored targets from kdloss.cache (build_cache → TopKCache → TopKCollator): the cache's own
    column names and loss options plug into KDTrainer; accumulation 2 equals the global mean."""
    from kdloss.cache import TopKCache, TopKCollator, build_cache

    sequences = [row["input_ids"][: 6 + 2 * i] for i, row in enumerate(token_rows(count=4))]
    build_cache(tiny_lm("llama", seed=1), sequences, str(tmp_path / "cache"), k=8, batch_size=4, progress=False)
    cache = TopKCache(str(tmp_path / "cache"))
    collate = TopKCollator(student_vocab_size=VOCAB)
    config = DistillationConfig(temperature=2.0, **cache.loss_kwargs())
    expected_loss, expected = reference_gradients_of_batch(tiny_lm("llama", seed=0), collate([cache[i] for i in
                                                                                             range(4)]), config)
    grab = GradientGrab()
    trainer = quiet(KDTrainer(model=tiny_lm("llama", seed=0), args=training_args(), train_dataset=cache,
                              data_collator=collate, callbacks=[grab], distillation=config))
    trainer.train()
    assert_same_gradients(grab.grads, expected)
    assert logged(trainer) == pytest.approx(expected_loss, rel=1e-5)


def test_own_compute_loss_with_trainer_equals_global_mean():
    teacher = tiny_lm("llama", seed=1)
    rows = token_rows()
    config = DistillationConfig(top_k=8, fused=True)
    _, expected = reference_gradients(tiny_lm("llama", seed=0), rows, config, teacher)

    class OwnLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            assert num_items_in_batch is not None  # Llama takes loss kwargs: Trainer counts the tokens
            return distillation_loss(model, inputs, num_items_in_batch, teacher_model=teacher, config=config,
                                     trainer=self)

    grab = GradientGrab()
    quiet(OwnLoss(model=tiny_lm("llama", seed=0), args=training_args(), train_dataset=rows, callbacks=[grab],
                  data_collator=DistillationCollator())).train()
    assert_same_gradients(grab.grads, expected)


def test_own_compute_loss_when_trainer_divides_by_accumulation():
    """A Trainer that divides every loss by the accumulation steps (loss_is_scaled_for_ga=False):
    distillation_loss(trainer=self) compensates, the step is still the global mean."""
    rows = token_rows(stored_k=8, teacher=tiny_lm("llama", seed=1))
    config = DistillationConfig()
    _, expected = reference_gradients(tiny_lm("llama", seed=0), rows, config)

    class DividesByAccumulation(Trainer):
        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return distillation_loss(model, inputs, num_items_in_batch, config=config, trainer=self)

    grab = GradientGrab()
    quiet(DividesByAccumulation(model=tiny_lm("llama", seed=0), args=training_args(remove_unused_columns=False),
                                train_dataset=rows,
                                callbacks=[grab], data_collator=DistillationCollator())).train()
    assert_same_gradients(grab.grads, expected)


def test_kdtrainer_keeps_teacher_columns_with_remove_unused_columns():
    rows = token_rows(stored_k=8, teacher=tiny_lm("llama", seed=1))
    dataset = datasets.Dataset.from_list(rows)
    trainer = quiet(KDTrainer(model=tiny_lm("llama", seed=0), args=training_args(remove_unused_columns=True),
                              train_dataset=dataset))
    trainer.train()
    assert torch.isfinite(torch.tensor(logged(trainer)))

    class OwnLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return distillation_loss(model, inputs, num_items_in_batch, trainer=self)

    plain = quiet(OwnLoss(model=tiny_lm("llama", seed=0), args=training_args(remove_unused_columns=True),
                          train_dataset=dataset, data_collator=DistillationCollator()))
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        plain.train()
    quiet(OwnLoss(model=tiny_lm("llama", seed=0), args=training_args(remove_unused_columns=False),
                  train_dataset=dataset, data_collator=DistillationCollator())).train()


# ------------------------------------------------------------------ architectures, tied heads, compile


def _batch(rows=None):
    return DistillationCollator()(rows or token_rows())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_fused_equals_plain_for_causal_lms(arch):
    """Tied (GPT-2, Qwen2) and untied (Llama) heads: the fused path reproduces the plain one, the
    embedding gradient included (it gets both the input and the output contributions when tied)."""
    teacher, batch = tiny_lm("llama", seed=1), _batch()
    results = []
    for fused in (False, True):
        student = tiny_lm(arch, seed=0)
        tied = student.get_output_embeddings().weight is student.get_input_embeddings().weight
        assert tied == (arch != "llama")
        loss = distillation_loss(student, batch, teacher_model=teacher,
                                 config=DistillationConfig(temperature=2.0, top_k=8, fused=fused, ce_weight=0.5))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert_same_gradients(results[1][1], results[0][1])


def test_plain_loss_is_topk_kl_of_shifted_logits():
    """The label shift: position t's logits are scored against label t + 1."""
    student, batch = tiny_lm("llama", seed=0), _batch(token_rows(stored_k=8, teacher=tiny_lm("llama", seed=1)))
    loss = distillation_loss(student, batch, config=DistillationConfig(temperature=2.0))
    logits = student(input_ids=batch["input_ids"]).logits[:, :-1]
    expected = topk_kl_loss(logits, batch["teacher_ids"][:, :-1], batch["teacher_values"][:, :-1],
                            batch["labels"][:, 1:], temperature=2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert shifted_labels({"labels": torch.tensor([[5, 6, 7]])}).tolist() == [[6, 7, -100]]


def test_compiled_student_matches_eager():
    teacher, batch = tiny_lm("llama", seed=1), _batch()
    config = DistillationConfig(top_k=8, fused=True)
    eager = tiny_lm("llama", seed=0)
    compiled_source = tiny_lm("llama", seed=0)
    compiled = torch.compile(compiled_source, backend="eager")
    assert unwrap_model(compiled) is compiled_source
    losses = []
    for model in (eager, compiled):
        loss = distillation_loss(model, batch, teacher_model=teacher, config=config)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert_same_gradients({n: p.grad for n, p in compiled_source.named_parameters()},
                          {n: p.grad for n, p in eager.named_parameters()})


@pytest.mark.parametrize("fused", [False, True])
def test_autocast_bf16(fused):
    """Inside CPU bf16 autocast (the student's matmuls in bf16, weights fp32) the loss is fp32 and
    close to the fp32 loss; every parameter gets an fp32 gradient."""
    teacher, batch = tiny_lm("llama", seed=1), _batch()
    config = DistillationConfig(temperature=2.0, top_k=8, fused=fused, ce_weight=0.5)
    expected = distillation_loss(tiny_lm("llama", seed=0), batch, teacher_model=teacher, config=config)
    student = tiny_lm("llama", seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = distillation_loss(student, batch, teacher_model=teacher, config=config)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected.detach(), rtol=2e-2, atol=1e-3)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in student.parameters())


def test_fused_head_refuses_a_head_it_cannot_reproduce():
    student = tiny_lm("llama", seed=0)
    student.config.final_logit_softcapping = 0.02  # Llama ignores it; the fused head would apply it
    with pytest.raises(ValueError, match="fused=False"):
        distillation_loss(student, _batch(), teacher_model=tiny_lm("llama", seed=1),
                          config=DistillationConfig(fused=True))


def test_online_teacher_with_larger_vocabulary_is_truncated():
    torch.manual_seed(1)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB + 16, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           max_position_embeddings=32))
    for fused in (False, True):
        loss = distillation_loss(tiny_lm("llama", seed=0), _batch(), teacher_model=teacher,
                                 config=DistillationConfig(top_k=VOCAB + 16, fused=fused))
        assert torch.isfinite(loss)


# ------------------------------------------------------------------ collator, validation


def test_collator_pads_every_field():
    rows = [{"input_ids": [5, 6, 7], "teacher_ids": [[1, 2], [3, 4]], "teacher_values": [[-0.1, -2.0]] * 2},
            {"input_ids": [8], "teacher_ids": [[9, 1]], "teacher_values": [[-0.5, -1.0]]}]
    batch = DistillationCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert batch["teacher_ids"].shape == (2, 3, 2) and batch["teacher_ids"][1, 1:].eq(0).all()
    assert torch.isneginf(batch["teacher_values"][1, 1:]).all()
    assert torch.isneginf(batch["teacher_values"][0, 2]).all()  # T - 1 stored positions padded too


@pytest.mark.parametrize("kwargs,error,match", [({"ce_weight": 1.5}, ValueError, "ce_weight"),
                                                ({"top_k": 0}, ValueError, "top_k"), ({"tail": "x"}, ValueError, "tail"),
                                                ({"fused": 1}, TypeError, "fused"),
                                                ({"temperature": 0.0}, ValueError, "temperature"),
                                                ({"teacher_ids_column": None}, TypeError, "teacher_ids_column")])
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        DistillationConfig(**kwargs)


def test_missing_labels_and_columns_are_explained():
    student = tiny_lm("llama", seed=0)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(student, {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="teacher_ids"):
        distillation_loss(student, _batch())


# ------------------------------------------------------------------ 2 processes: DDP through Trainer


def _ddp_trainer_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    teacher, rows = tiny_lm("llama", seed=1), token_rows(count=8)
    config = DistillationConfig(temperature=2.0, top_k=8, fused=True)

    class OwnLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return distillation_loss(model, inputs, num_items_in_batch, teacher_model=teacher, config=config,
                                     trainer=self)

    results = {}
    for name in ("KDTrainer", "own compute_loss"):
        grab = GradientGrab()
        args = training_args(ddp_backend="gloo")
        if name == "KDTrainer":
            trainer = KDTrainer(model=tiny_lm("llama", seed=0), args=args, train_dataset=datasets.Dataset.from_list(
                rows), callbacks=[grab], teacher_model=teacher, distillation=config)
        else:
            trainer = OwnLoss(model=tiny_lm("llama", seed=0), args=args, train_dataset=rows, callbacks=[grab],
                              data_collator=DistillationCollator())
        quiet(trainer).train()
        assert trainer.accelerator.num_processes == world
        results[name] = (grab.grads, logged(trainer))
    if rank == 0:
        torch.save(results, out)
    # Gloo's worker threads must be stopped before the interpreter tears down: a rank that exits with
    # its process group alive can abort ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_trainer_ddp_two_processes_equals_global_mean(tmp_path):
    """2 gloo processes × accumulation 2, rows with very different counted tokens: the averaged DDP
    gradient equals the single-process gradient of the global mean, for KDTrainer and for a user's
    own compute_loss calling distillation_loss(..., trainer=self)."""
    out = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_trainer_worker, args=(2, free_port(), out), nprocs=2)
    results = torch.load(out)
    config = DistillationConfig(temperature=2.0, top_k=8, fused=True)
    expected_loss, expected = reference_gradients(tiny_lm("llama", seed=0), token_rows(count=8), config,
                                                  tiny_lm("llama", seed=1))
    for name, (grads, loss) in results.items():
        assert_same_gradients(grads, expected)
        assert loss == pytest.approx(expected_loss, rel=1e-5), name


# ------------------------------------------------------------------ sentence-transformers

WORDS = [f"w{i}" for i in range(30)]


def _tiny_bert_dir(num_labels: int | None, seed: int = 0) -> str:
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    path = tempfile.mkdtemp(prefix="kdloss_test_bert_")
    vocab = os.path.join(path, "vocab.txt")
    with open(vocab, "w") as handle:
        handle.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    BertTokenizerFast(vocab).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    if num_labels is None:
        BertModel(config).save_pretrained(path)
    else:
        config.num_labels, config.id2label, config.label2id = 1, {0: "score"}, {"score": 0}
        BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bi_encoder_dir():
    return _tiny_bert_dir(None)


@pytest.fixture(scope="module")
def cross_encoder_dir():
    return _tiny_bert_dir(1)


def _sentences(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (count,), generator=generator)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=generator)) for n in lengths]


def test_st_margin_mse_equals_sentence_transformers_in_its_trainer(bi_encoder_dir):
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss as STMarginMSELoss

    from kdloss.integrations.sentence_transformers import MarginMSELoss

    n = 12
    columns = {"query": _sentences(n, 1), "positive": _sentences(n, 2), "negative_1": _sentences(n, 3),
               "negative_2": _sentences(n, 4), "label": torch.randn(n, 3, generator=torch.Generator().manual_seed(
                   0)).tolist()}
    dataset = datasets.Dataset.from_dict(columns)
    runs = []
    for loss_class in (STMarginMSELoss, MarginMSELoss):
        model = SentenceTransformer(bi_encoder_dir, device="cpu")
        args = SentenceTransformerTrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=3,
                                                    learning_rate=1e-3, logging_steps=1, report_to=[],
                                                    save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
        trainer = quiet(SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                                   loss=loss_class(model)))
        trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        runs.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (st_losses, st_params), (losses, params) = runs
    assert len(losses) == 3
    assert losses == pytest.approx(st_losses, rel=1e-5)
    torch.testing.assert_close(params, st_params, rtol=0, atol=1e-6)


@pytest.mark.parametrize("negatives,fmt", [(1, "scores"), (1, "margin_1d"), (1, "margins"), (3, "scores"),
                                           (3, "margins")])
@pytest.mark.parametrize("cosine", [False, True])
def test_st_margin_mse_label_formats_match(negatives, fmt, cosine):
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss as STMarginMSELoss
    from sentence_transformers.util import pairwise_cos_sim, pairwise_dot_score

    from kdloss.integrations.sentence_transformers import MarginMSELoss

    generator = torch.Generator().manual_seed(negatives)
    batch = 5
    embeddings = [torch.randn(batch, 8, generator=generator, dtype=torch.float64, requires_grad=True)
                  for _ in range(2 + negatives)]
    labels = {"scores": torch.randn(batch, negatives + 1, generator=generator),
              "margins": torch.randn(batch, negatives, generator=generator),
              "margin_1d": torch.randn(batch, generator=generator)}[fmt]
    similarity = pairwise_cos_sim if cosine else pairwise_dot_score
    st_loss = STMarginMSELoss(None, similarity_fct=similarity)
    expected = st_loss.compute_loss_from_embeddings(embeddings, labels.double())
    expected_grads = torch.autograd.grad(expected, embeddings)
    ours = MarginMSELoss(None, similarity_fct=pairwise_cos_sim if cosine else None)
    actual = ours.compute_loss_from_embeddings(embeddings, labels)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    for a, e in zip(torch.autograd.grad(actual, embeddings), expected_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_cross_encoder_margin_mse_matches_sentence_transformers(cross_encoder_dir):
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.cross_encoder.losses import MarginMSELoss as STCrossMarginMSELoss

    from kdloss.integrations.sentence_transformers import CrossEncoderMarginMSELoss

    model = CrossEncoder(cross_encoder_dir, device="cpu")
    inputs = [_sentences(4, 1), _sentences(4, 2), _sentences(4, 3), _sentences(4, 4)]
    labels = list(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))  # the collator's list form
    with torch.no_grad():
        expected = STCrossMarginMSELoss(model)(inputs, labels)
        actual = CrossEncoderMarginMSELoss(model)(inputs, labels)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def test_st_plackett_luce_bi_encoder(bi_encoder_dir):
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    from kdloss.functional import plackett_luce_loss
    from kdloss.integrations.sentence_transformers import PlackettLuceLoss

    generator = torch.Generator().manual_seed(0)
    embeddings = [torch.randn(3, 8, generator=generator) for _ in range(5)]
    teacher = torch.randn(3, 4, generator=generator)
    scores = torch.stack([(embeddings[0] * d).sum(-1) for d in embeddings[1:]], dim=1)
    for label_index, target in ((0, torch.zeros(3, dtype=torch.long)), (None, teacher.argmax(-1))):
        loss = PlackettLuceLoss(None, scale=2.0, temperature=0.5, label_index=label_index)
        torch.testing.assert_close(loss.compute_loss_from_embeddings(embeddings, teacher),
                                   plackett_luce_loss(2.0 * scores, teacher, target, temperature=0.5))

    model = SentenceTransformer(bi_encoder_dir, device="cpu")
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    columns = {"query": _sentences(8, 1), **{f"d{j}": _sentences(8, 10 + j) for j in range(3)},
               "label": torch.randn(8, 3, generator=generator).tolist()}
    args = SentenceTransformerTrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=2,
                                                learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                                use_cpu=True, disable_tqdm=True)
    trainer = quiet(SentenceTransformerTrainer(model=model, args=args, loss=PlackettLuceLoss(model),
                                               train_dataset=datasets.Dataset.from_dict(columns)))
    trainer.train()
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)
    assert not torch.equal(before, torch.cat([p.detach().flatten() for p in model.parameters()]))


def test_cross_encoder_plackett_luce_listwise(cross_encoder_dir):
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments

    from kdloss.functional import plackett_luce_loss
    from kdloss.integrations.sentence_transformers import CrossEncoderPlackettLuceLoss

    model = CrossEncoder(cross_encoder_dir, device="cpu")
    queries = _sentences(3, 1)
    lists = [_sentences(n, 10 + n) for n in (3, 5, 3)]  # different lengths: no padding, grouped by length
    generator = torch.Generator().manual_seed(0)
    labels = [torch.randn(len(d), generator=generator) for d in lists]
    loss_fn = CrossEncoderPlackettLuceLoss(model, label_index=None)
    with torch.no_grad():
        actual = loss_fn([queries, lists], labels)
        rows = []
        for query, documents, teacher in zip(queries, lists, labels, strict=True):
            scores = model.predict([(query, d) for d in documents], convert_to_tensor=True,
                                   activation_fn=torch.nn.Identity())
            rows.append(plackett_luce_loss(scores[None], teacher[None], teacher.argmax()[None]))
        expected = torch.stack(rows).mean()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one teacher score per document"):
        loss_fn([queries, lists], [t[:2] for t in labels])

    train = datasets.Dataset.from_dict({"query": queries * 2, "documents": lists * 2,
                                        "labels": [t.tolist() for t in labels] * 2})
    args = CrossEncoderTrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=3, max_steps=2,
                                         learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                         use_cpu=True, disable_tqdm=True)
    trainer = quiet(CrossEncoderTrainer(model=model, args=args, train_dataset=train, loss=loss_fn))
    trainer.train()
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)
