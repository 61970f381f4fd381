"""Distil a tiny GPT-2 student through the fused LM head, from your own ``Trainer.compute_loss``.

The student is a random-weight GPT-2 (input and output embeddings tied), the teacher a
random-weight Llama with the same vocabulary; both are built from configs. With
``DistillationConfig(fused=True)`` the student's last hidden states (taken through whatever
wrapper the Trainer put around the model) and its output embedding go to
``kdloss.functional.fused_linear_topk_kl_loss``: the ``[B, T, V]`` student logits are never
built (the model is asked for the last position's logits only). The teacher's top-k is computed
from its hidden states a bounded slice at a time. This example keeps a plain ``transformers.Trainer``
and overrides ``compute_loss`` with ``kdloss.integrations.transformers.distillation_loss``;
``trainer=self`` lets it convert the Trainer's token count for DDP and gradient accumulation.

    python examples/llm_fused_head.py [--steps 40] [--out DIR]

Prints ``step i loss L`` per optimizer step and writes ``loss.png``.
"""

from __future__ import annotations

import _common

VOCAB = 256


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], steps=40)
    out = _common.output_dir(args, "llm_fused_head")
    _common.quiet()
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from kdloss.integrations.transformers import DistillationCollator, DistillationConfig, distillation_loss

    teacher = _common.tiny_llama(VOCAB, hidden=64, layers=2, seed=1, init=0.1).eval().requires_grad_(False)
    student = _common.tiny_gpt2(VOCAB, hidden=32, layers=2, seed=0)
    tied = student.get_output_embeddings().weight is student.get_input_embeddings().weight
    print(f"student GPT-2, tied embeddings: {tied}; teacher Llama; V = {VOCAB}", flush=True)
    config = DistillationConfig(temperature=2.0, top_k=32, fused=True)

    class FusedKDTrainer(Trainer):
        shown = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, output = distillation_loss(model, inputs, num_items_in_batch, teacher_model=teacher,
                                             config=config, trainer=self, return_outputs=True)
            if not self.shown:
                self.shown = True
                print(f"student logits kept by the model: {list(output.student_outputs.logits.shape)} "
                      f"(input {list(inputs['input_ids'].shape)})", flush=True)
            return (loss, output.student_outputs) if return_outputs else loss

    training_args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=args.steps,
        learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = FusedKDTrainer(model=student, args=training_args,
                             train_dataset=Dataset.from_list(_common.token_sequences(64, VOCAB, seed=0)),
                             data_collator=DistillationCollator(pad_token_id=0))
    _common.silent_trainer(trainer)
    trainer.train()
    curves = _common.print_trainer_log(trainer.state.log_history, keys=("loss",))
    _common.report(curves, out, "fused LM head (GPT-2, tied embeddings)")


if __name__ == "__main__":
    main()
