"""Distil a tiny Hugging Face ViT with token-level relationship graphs (TRG) and SinKD.

Teacher and student are ``ViTForImageClassification`` models built from tiny ``ViTConfig``s
(16×16 images, 4×4 patches, random weights; nothing is downloaded). The task is synthetic: 10
classes, each a fixed random image template plus noise. The teacher is first trained for
``--steps`` steps with cross-entropy; then the student is trained with

    loss = CE(student, y) + 0.2 · SinKD(student logits, teacher logits) + TRG(student patches, teacher patches)

``kdloss.SinkhornLoss`` couples the batch's student and teacher class distributions through a
Sinkhorn transport plan; ``kdloss.TRGLoss`` matches the patch tokens' contextual similarities
(inner), a k-NN graph over sampled tokens (local) and a contrastive term on learned projections
(global). TRGLoss has trainable projection heads: ``kdloss.distributed.register_loss`` makes it a
submodule of the student before the optimizer is built, so the projections are optimised (and,
under DDP, synchronised) like the student's own weights.

    python examples/vit_trg_sinkd.py [--steps 40] [--out DIR]

Prints ``step i loss L ce C sinkd S trg G`` per student step and writes ``loss.png``.
"""

from __future__ import annotations

import _common
import torch
import torch.nn.functional as F

CLASSES = 10
BATCH = 16


def tiny_vit(hidden: int, layers: int, seed: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=4, intermediate_size=2 * hidden, num_labels=CLASSES,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


class SyntheticImages:
    """Class templates plus noise; ``batch(step)`` is deterministic."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.templates = torch.randn(CLASSES, 3, 16, 16, generator=generator)
        self.seed = seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_000 + step)
        labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        images = self.templates[labels] + 1.5 * torch.randn(BATCH, 3, 16, 16, generator=generator)
        return images, labels


def train_teacher(teacher, data: SyntheticImages, steps: int) -> None:
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(steps):
        images, labels = data.batch(10_000 + step)
        F.cross_entropy(teacher(pixel_values=images).logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.eval().requires_grad_(False)


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], steps=40)
    out = _common.output_dir(args, "vit_trg_sinkd")
    _common.quiet()
    import kdloss
    from kdloss.distributed import register_loss

    data = SyntheticImages()
    teacher, student = tiny_vit(48, 2, seed=1), tiny_vit(32, 1, seed=0)
    train_teacher(teacher, data, args.steps)
    sinkd = kdloss.SinkhornLoss(temperature=2.0, scale=0.2)
    register_loss(student, kdloss.TRGLoss(student_dim=32, teacher_dim=48, embed_dim=32, num_samples=8, k=4))
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)  # includes TRG's projection heads
    print(f"student parameters: {sum(p.numel() for p in student.parameters())} "
          f"(TRG projections: {sum(p.numel() for p in student.distillation_loss.parameters())})", flush=True)

    curves: dict[str, list[float]] = {"loss": [], "ce": [], "sinkd": [], "trg": []}
    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        images, labels = data.batch(step)
        with torch.no_grad():
            t = teacher(pixel_values=images, output_hidden_states=True)
        s = student(pixel_values=images, output_hidden_states=True)
        s_patches, t_patches = s.hidden_states[-1][:, 1:], t.hidden_states[-1][:, 1:]  # drop [CLS]
        terms = {"ce": F.cross_entropy(s.logits, labels), "sinkd": sinkd(s.logits, t.logits),
                 "trg": student.distillation_loss(s_patches, t_patches, generator=generator)}
        loss = sum(terms.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for name, value in {"loss": loss, **terms}.items():
            curves[name].append(value.item())
        _common.print_step(step + 1, loss.item(), **{k: v.item() for k, v in terms.items()})
    with torch.no_grad():
        images, labels = data.batch(99_999)
        accuracy = {name: (m(pixel_values=images).logits.argmax(-1) == labels).float().mean().item()
                    for name, m in (("teacher", teacher), ("student", student))}
    print(f"held-out batch accuracy: teacher {accuracy['teacher']:.2f}, student {accuracy['student']:.2f}", flush=True)
    _common.report(curves, out, "ViT: CE + SinKD + TRG")


if __name__ == "__main__":
    main()
