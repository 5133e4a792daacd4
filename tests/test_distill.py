"""Knowledge distillation: the vocab-parallel divergences against their formulas on full-vocab fp32 references
(and ModelOpt's LogitsDistillationLoss), tp2 = tp1, and `rl distill` end to end on the tiny configs: the
student's held-out KL to the teacher falls and its accuracy rises, off-policy and on-policy; differing
tokenizers are refused in one line with exit 2, before anything is written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist import run_distributed

from core.tensor_parallel.cross_entropy import vocab_parallel_divergence

ROOT = Path(__file__).resolve().parents[1]


def _logits(seed: int = 0, shape: tuple[int, ...] = (2, 5, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g) * 3


def _reference(student: torch.Tensor, teacher: torch.Tensor, kind: str, tau: float, beta: float, top_k):
    """The divergence by its definition on full fp32 logits (torch.kl_div / explicit sums), times tau^2."""
    s, t = student.double() / tau, teacher.double() / tau
    if top_k is not None:  # both distributions over the teacher's top k, renormalised
        drop = teacher < teacher.topk(top_k, dim=-1).values[..., -1:]
        s, t = s.masked_fill(drop, -math.inf), t.masked_fill(drop, -math.inf)
    logq, logp = s.log_softmax(-1), t.log_softmax(-1)
    if top_k is None and kind == "forward_kl":  # kl_div(input=log q, target=log p) = sum p (log p - log q)
        return F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1) * tau**2
    keep = torch.isfinite(logp)  # the kept ids: logs set to 0 elsewhere so no nan reaches the gradient
    logp, logq = logp.masked_fill(~keep, 0), logq.masked_fill(~keep, 0)
    logm = (beta * logp.exp() + (1 - beta) * logq.exp()).log()

    def kl(loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:  # sum a log(a / b) over the kept ids
        return torch.where(keep, loga.exp() * (loga - logb), 0.0).sum(-1)

    loss = {
        "forward_kl": kl(logp, logq),
        "reverse_kl": kl(logq, logp),
        "jsd": beta * kl(logp, logm) + (1 - beta) * kl(logq, logm),
    }[kind]
    return loss * tau**2


CASES = [
    ("forward_kl", 1.0, 0.5, None),
    ("forward_kl", 2.0, 0.5, 5),
    ("reverse_kl", 1.0, 0.5, None),
    ("reverse_kl", 0.7, 0.5, 4),
    ("jsd", 1.0, 0.5, None),
    ("jsd", 2.0, 0.1, None),
    ("jsd", 1.5, 0.9, 6),
]


@pytest.mark.parametrize(("kind", "tau", "beta", "top_k"), CASES)
def test_divergence_matches_its_formula_and_gradient(kind, tau, beta, top_k):
    student, teacher = _logits()
    student.requires_grad_(True)
    loss = vocab_parallel_divergence(student, teacher, kind, None, tau, beta, top_k)  # (2, 5)
    ref_student = student.detach().double().requires_grad_(True)
    ref = _reference(ref_student, teacher, kind, tau, beta, top_k)
    assert loss.shape == (2, 5) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    weights = torch.rand(2, 5)  # a non-uniform upstream gradient
    (loss * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(student.grad.double(), ref_student.grad, atol=1e-5, rtol=1e-5)
    assert (loss >= -1e-6).all()


@pytest.mark.slow  # importing modelopt: ~20 s
def test_divergences_are_zero_at_the_teacher_and_forward_kl_is_modelopts():
    from modelopt.torch.distill import LogitsDistillationLoss

    student, teacher = _logits(1)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert vocab_parallel_divergence(teacher, teacher, kind, None).abs().max() < 1e-5
    ours = vocab_parallel_divergence(student, teacher, "forward_kl", None, temperature=2.0)
    theirs = LogitsDistillationLoss(temperature=2.0, reduction="none")(student, teacher)  # (2, 5)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _tp_divergences(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    group = dist.new_group(list(range(world_size)))
    student, teacher = _logits(2, (3, 4, 32))
    v = 32 // world_size
    out = {}
    for kind, tau, beta, top_k in CASES:
        s = student[..., rank * v : (rank + 1) * v].clone().requires_grad_(True)
        loss = vocab_parallel_divergence(
            s, teacher[..., rank * v : (rank + 1) * v], kind, group, tau, beta, top_k
        )
        loss.sum().backward()
        out[f"{kind}-{tau}-{beta}-{top_k}"] = (loss.detach(), s.grad)
    return out


@pytest.mark.slow
def test_vocab_parallel_divergences_at_tp2_equal_tp1():
    """Loss and every logit gradient, tp=2 over gloo against one process. Losses within 1e-6 (+ 1e-6
    relative: fp32 sums of 32 terms in another order, values up to ~10); gradients within 1e-5, as they are
    q (log q - log p - KL): differences of fp32 logs of size ~10, each good to ~1e-6."""
    tp2 = run_distributed(_tp_divergences, 2)
    student, teacher = _logits(2, (3, 4, 32))
    for kind, tau, beta, top_k in CASES:
        s = student.clone().requires_grad_(True)
        loss = vocab_parallel_divergence(s, teacher, kind, None, tau, beta, top_k)
        loss.sum().backward()
        key = f"{kind}-{tau}-{beta}-{top_k}"
        for rank in range(2):
            torch.testing.assert_close(tp2[rank][key][0], loss.detach(), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(
                tp2[rank][key][1], s.grad[..., rank * 16 : (rank + 1) * 16], atol=1e-5, rtol=0
            )


# ---- rl distill end to end ----------------------------------------------------------------------------


def rl(*argv: str) -> int:
    from rl.cli import main

    return main([*argv])


def evals(run_dir: Path, key: str) -> list[float]:
    from core.utils.metrics import read_metrics

    return [r[key] for r in read_metrics(run_dir) if key in r]


@pytest.fixture(scope="module")
def teacher(tiny_pretrain_400) -> Path:
    """The tiny pretrain at step 400 (~60% held-out accuracy), as configs/distill_tiny.yaml's teacher."""
    return tiny_pretrain_400 / "checkpoints" / "step_400"


def distill(teacher: Path, run_dir: Path, *overrides: str) -> int:
    return rl(
        "distill",
        str(ROOT / "configs/distill_tiny.yaml"),
        f"run.dir={run_dir}",
        f"teacher.init_from={teacher}",
        "train.max_steps=30",
        "train.eval_every=30",
        "train.save_every=30",
        "train.log_every=10",
        "eval.num_rows=100",
        "train.progress_bar=false",
        *overrides,
    )


@pytest.mark.slow
@pytest.mark.parametrize("on_policy_frac", [0.0, 1.0], ids=["off_policy", "on_policy"])
def test_distill_lowers_held_out_kl_and_raises_accuracy(teacher, tmp_path, on_policy_frac):
    """The student (two of the teacher's three layers) after 30 steps, against itself at step 0."""
    run_dir = tmp_path / "distill"
    assert distill(teacher, run_dir, f"algorithm.on_policy_frac={on_policy_frac}") == 0
    kl, accuracy = evals(run_dir, "eval/kl"), evals(run_dir, "eval/accuracy")
    assert len(kl) == 2 and kl[-1] < 0.5 * kl[0], kl
    assert accuracy[-1] > accuracy[0], accuracy
    assert evals(run_dir, "train/on_policy") == [on_policy_frac] * 3
    assert (run_dir / "checkpoints/step_30/meta.json").is_file() and (
        run_dir / "hf/model.safetensors"
    ).is_file()


def _other_tokenizer_model(path: Path, teacher: Path) -> Path:
    """A tiny model next to a tokenizer with one id moved (same size, another vocabulary)."""
    import json

    from algorithms.rl_inputs import load_init, resolve_init
    from core.bridge import save_hf

    model, arch = load_init(resolve_init(teacher))
    tokenizer_dir = resolve_init(teacher).tokenizer
    save_hf(model, path, arch=arch, tokenizer_dir=tokenizer_dir)
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    special = {t["content"] for t in spec.get("added_tokens", [])}
    (a, ia), (b, ib) = [(k, v) for k, v in sorted(vocab.items(), key=lambda kv: kv[1]) if k not in special][
        :2
    ]
    vocab[a], vocab[b] = ib, ia
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return path


@pytest.mark.slow
def test_different_tokenizers_are_refused_in_one_line(teacher, tmp_path, capsys):
    student = _other_tokenizer_model(tmp_path / "student_hf", teacher)
    run_dir = tmp_path / "distill"
    code = distill(teacher, run_dir, f"student.init_from={student}", "student.layers_from_teacher=null")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tokenizer" in err[0], err
    assert not run_dir.exists()


@pytest.mark.slow
def test_distill_at_tp2_matches_tp1_and_runs_on_policy(teacher, tmp_path):
    """Step 0 (same weights at every layout): the held-out KL to the teacher at tp=2 (teacher and student
    vocab-sharded, gloo) equals tp=1 within fp32 summation order; then on-policy steps run at tp=2."""
    quick = ["train.max_steps=1", "train.eval_every=1", "eval.num_rows=16", "algorithm.on_policy_frac=1.0"]
    assert distill(teacher, tmp_path / "tp1", *quick) == 0
    assert distill(teacher, tmp_path / "tp2", *quick, "parallel.tp=2") == 0
    kl1, kl2 = evals(tmp_path / "tp1", "eval/kl"), evals(tmp_path / "tp2", "eval/kl")
    assert len(kl2) == 2 and abs(kl2[0] - kl1[0]) < 1e-5 * kl1[0], (kl1, kl2)
    assert evals(tmp_path / "tp2", "eval/accuracy")[0] == evals(tmp_path / "tp1", "eval/accuracy")[0]
