"""Gradients through the frozen teacher late part (TPP), and a teacher that stays frozen and in eval()."""
from __future__ import annotations

import pytest
import torch

from scalekd.distiller import LOSS_TERMS
from scalekd.targets import OnlineTargets

TEACHERS = {
    "vit": ("vit_tiny_patch16_224", None),  # the factory's 3-block, 64 px ViT-Tiny
    "effnet": ("tf_efficientnet_lite0", dict(num_classes=10)),
    "swin": ("swin_tiny_patch4_window7_224", dict(num_classes=10)),
}


def _batch(split, b=2):
    images = torch.randn(b, 3, 160, 160)  # test_resnet student
    targets = OnlineTargets(split)(torch.randn(b, *split.info.input_size))
    return images, targets, torch.arange(b) % split.info.num_classes


def _grad_norm(module):
    grads = [p.grad for p in module.parameters()]
    assert all(g is not None for g in grads), [n for n, p in module.named_parameters() if p.grad is None]
    return sum(g.abs().sum().item() for g in grads)


@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_full_loss_gradients_reach_student_and_all_four_caps(make_distiller, teacher):
    name, kwargs = TEACHERS[teacher]
    distiller, split = make_distiller(teacher=name, teacher_kwargs=kwargs)
    distiller.train()
    out = distiller(*_batch(split))
    out["loss"].backward()
    for key, cap in distiller.caps.items():
        assert _grad_norm(cap) > 0, key
        for n, p in cap.named_parameters():
            assert torch.isfinite(p.grad).all(), (key, n)
    assert _grad_norm(distiller.student) > 0
    # the frozen teacher: no parameter asks for or gets a gradient
    teacher_params = list(distiller.late.parameters())
    assert teacher_params and all(not p.requires_grad and p.grad is None for p in teacher_params)
    ids = {id(p) for p in teacher_params}
    assert not any(id(p) in ids for p in distiller.trainable_parameters())
    assert len(distiller.trainable_parameters()) == len(list(distiller.student.parameters())) + len(
        list(distiller.caps.parameters()))


def test_proxy_term_gradient_reaches_stage3_cap_and_student_only_through_late(make_distiller):
    # proxy_direct = α·L(late(CAP_s3_direct(s3)), F^t): CAP_s3's only way to the loss is through late
    distiller, split = make_distiller(teacher="tf_efficientnet_lite0", teacher_kwargs=dict(num_classes=10))
    distiller.train()
    out = distiller(*_batch(split))
    out["proxy_direct"].backward()
    assert _grad_norm(distiller.caps["s3_direct"]) > 0
    for key in ("s3_dc", "s4_direct", "s4_dc"):
        # None, or exactly zero where both views share one batched pass through late
        assert all(p.grad is None or not p.grad.any() for p in distiller.caps[key].parameters()), key
    student = distiller.student.model
    assert _grad_norm(student.conv1) > 0 and _grad_norm(student.layer3) > 0  # up to stage 3
    assert all(p.grad is None for p in student.layer4.parameters())  # stage 4 is not on this path
    assert all(p.grad is None for p in student.get_classifier().parameters())
    assert all(p.grad is None for p in distiller.late.parameters())


def test_main_term_gradient_reaches_stage3_cap_through_undetached_queries(make_distiller):
    distiller, split = make_distiller()
    distiller.train()
    out = distiller(*_batch(split))
    out["main_direct"].backward()
    assert _grad_norm(distiller.caps["s4_direct"]) > 0
    assert _grad_norm(distiller.caps["s3_direct"]) > 0  # queries = proxy output, not detached
    for key in ("s3_dc", "s4_dc"):
        # None, or exactly zero where both views share one batched pass through late
        assert all(p.grad is None or not p.grad.any() for p in distiller.caps[key].parameters()), key
    assert _grad_norm(distiller.student.model.layer4) > 0


def test_dc_terms_train_only_the_dc_caps(make_distiller):
    distiller, split = make_distiller()
    distiller.train()
    out = distiller(*_batch(split))
    (out["proxy_dc"] + out["main_dc"]).backward()
    assert _grad_norm(distiller.caps["s3_dc"]) > 0 and _grad_norm(distiller.caps["s4_dc"]) > 0
    for key in ("s3_direct", "s4_direct"):
        # None, or exactly zero where both views share one batched pass through late
        assert all(p.grad is None or not p.grad.any() for p in distiller.caps[key].parameters()), key


@pytest.mark.parametrize("teacher", ["effnet", "vit"])
def test_teacher_stays_eval_and_unchanged_after_train_and_optimizer_step(make_distiller, teacher):
    name, kwargs = TEACHERS[teacher]
    distiller, split = make_distiller(teacher=name, teacher_kwargs=kwargs)
    teacher_model = distiller.late.model
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    bn_keys = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert (len(bn_keys) > 0) == (teacher == "effnet")
    late_bn = [k for k in bn_keys if k.startswith(("blocks.5", "blocks.6", "bn2"))]  # in late itself
    assert teacher != "effnet" or late_bn
    student_bn_before = distiller.student.model.bn1.running_mean.clone()

    distiller.train()
    # an optimizer over ALL the distiller's parameters, weight decay included: the teacher must still not move
    opt = torch.optim.AdamW(distiller.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        distiller(*_batch(split))["loss"].backward()
        opt.step()

    assert not distiller.late.training
    assert all(not m.training for m in distiller.late.modules())
    assert distiller.training and distiller.student.training and all(m.training for m in distiller.caps.modules())
    after = teacher_model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    # control: the step did run in train mode, the student's BatchNorm statistics moved
    assert not torch.equal(distiller.student.model.bn1.running_mean, student_bn_before)

    distiller.eval()
    distiller.train()
    assert all(not m.training for m in distiller.late.modules())


def test_vit_teacher_with_drop_path_is_deterministic_while_distiller_trains(make_distiller):
    distiller, split = make_distiller(teacher_kwargs=dict(depth=3, img_size=64, num_classes=10, drop_path_rate=0.5))
    assert any(type(m).__name__ == "DropPath" and m.drop_prob > 0 for m in distiller.late.model.modules())
    distiller.train()
    assert distiller.training and not distiller.late.training
    mid = split.early(torch.randn(2, 3, 64, 64))
    proxy_in = torch.randn(2, 16, 192)  # patch tokens only, as from CAP_s3
    with torch.no_grad():
        a, b = distiller.late(mid), distiller.late(mid)
        pa, pb = distiller.late(proxy_in), distiller.late(proxy_in)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        p1, _ = distiller.paths(images)
        p2, _ = distiller.paths(images)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=0, atol=0)
    # control: with the timm model itself put in train(), drop-path is live and the outputs differ
    distiller.late.model.train()
    with torch.no_grad():
        c, d = distiller.late(mid), distiller.late(mid)
    assert (c - d).abs().max().item() > 1e-3
    distiller.late.model.eval()


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(make_distiller):
    distiller, split = make_distiller()
    batch = _batch(split)
    distiller.train()
    opt = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        out = distiller(*batch)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert set(LOSS_TERMS) <= set(out)


# Found while writing this suite (AttributeError on model.patch_embed.grid_size after drop_early); fixed in 852f8f6.
@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_distiller_on_dropped_early_teacher_gives_the_same_loss_and_gradients(make_distiller, teacher):
    # what the cached trainer does: only late's weights remain, targets come from elsewhere
    name, kwargs = TEACHERS[teacher]
    distiller, split = make_distiller(teacher=name, teacher_kwargs=kwargs)
    batch = _batch(split)
    distiller.train()
    ref = distiller(*batch)
    ref["loss"].backward()
    ref_grads = {n: p.grad.clone() for n, p in distiller.named_parameters() if p.requires_grad}
    distiller.zero_grad(set_to_none=True)
    split.drop_early()
    out = distiller(*batch)
    out["loss"].backward()
    for k in LOSS_TERMS:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)
    for n, p in distiller.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=0, atol=0)


@pytest.mark.parametrize("teacher", ["vit_tiny_patch16_224", "tf_efficientnet_lite0"])
def test_one_batched_late_pass_gives_the_two_pass_loss_and_gradients(make_distiller, teacher):
    import torch

    from scalekd.targets import Targets

    kwargs = dict(depth=3, img_size=64, num_classes=10) if teacher.startswith("vit") else dict(num_classes=10)
    distiller, split = make_distiller(teacher=teacher, teacher_kwargs=kwargs)
    distiller.train()
    x = torch.randn(2, *distiller.student.input_size)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        t = split.targets(torch.randn(2, *split.info.input_size))
    targets = Targets.from_final(t["final"], t["logits"])
    results = []
    for batched in (False, True):
        distiller.batch_late = batched
        distiller.zero_grad()
        torch.manual_seed(0)
        out = distiller(x, targets, labels)
        out["loss"].backward()
        results.append(({k: v.item() for k, v in out.items() if k != "logits"},
                        {n: p.grad.clone() for n, p in distiller.named_parameters() if p.grad is not None}))
    (terms_a, grads_a), (terms_b, grads_b) = results
    for k in terms_a:
        assert terms_b[k] == pytest.approx(terms_a[k], rel=1e-5, abs=1e-7), k
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6)
