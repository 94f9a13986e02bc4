"""condense.py --continual (S11, Fig. S8/S9; Zhao & Bilen 2021) and the two-class view of
Fig. 7: the replay loss and distillation written out by hand, which heads learn from what,
the cosine schedule against its formula, the colour-coded difference on hand-made pixels,
the checks of the condensed sets, and a CPU smoke run interrupted and resumed."""
import argparse
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import condense
import datasets
import glow
import nets

ROOT = Path(__file__).resolve().parent.parent


def tiny_net(seed=0, classes=(3, 4, 2)):
    torch.manual_seed(seed)
    return condense.MultiHeadConvNet(list(classes), width=4)


def batch(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def cross_entropy(logits, y):
    """CE written out: mean over the batch of log Σ_c exp(z_c) − z_y (float64)."""
    z = logits.double()
    return (z.exp().sum(1).log() - z[torch.arange(len(y)), y]).mean()


def soft_cross_entropy(student, teacher, t):
    """KD written out: mean over the batch of −Σ_c p_c·log q_c, p = softmax(teacher/t),
    q = softmax(student/t) (float64)."""
    p = (teacher.double() / t).exp()
    p = p / p.sum(1, keepdim=True)
    q = (student.double() / t).exp()
    return -(p * (q / q.sum(1, keepdim=True)).log()).sum(1).mean()


def test_replay_loss_is_every_condensed_set_through_its_own_head():
    """Task 3 of 3: CE of the real batch on head 2, plus the CE of condensed set j on head j
    for j = 0, 1 (not another head, none left out); with --no-replay only the first term."""
    net = tiny_net()
    (x, y), s0, s1 = batch(5, 2, 1), batch(3, 3, 2), batch(4, 4, 3)
    with torch.no_grad():
        real = cross_entropy(net(x, 2), y)
        replayed = cross_entropy(net(s0[0], 0), s0[1]) + cross_entropy(net(s1[0], 1), s1[1])
        loss = condense.continual_loss(net, x, y, 2, [(*s0, 0), (*s1, 1)])
        plain = condense.continual_loss(net, x, y, 2, [])
    # the same float32 logits on both sides: only continual_loss's float32 log-sum-exp and
    # means round (~1e-7 relative, seen 7e-8); a set or head left out moves it by ≥ 3%
    assert loss.item() == pytest.approx((real + replayed).item(), rel=1e-5)
    assert plain.item() == pytest.approx(real.item(), rel=1e-5)
    assert replayed.item() > 0.1  # the replay terms are not negligible


def test_earlier_heads_are_frozen_and_replay_trains_the_features():
    """The loss gives an earlier head exactly the gradient of its own condensed set's CE,
    none from the later task's real images; the optimizer of a task holds the features and
    its own head only (the authors' train_old_clfs=False), so an epoch of task 2 leaves
    head 1 (and the later head 3) bit for bit unchanged, with or without replay, while the
    replay changes how the features move."""
    net = tiny_net()
    (x, y), s0, s1 = batch(5, 2, 1), batch(3, 3, 2), batch(4, 4, 3)
    condense.continual_loss(net, x, y, 2, [(*s0, 0), (*s1, 1)]).backward()
    got = [p.grad.clone() for p in net.heads[:2].parameters()]
    net.zero_grad()
    (torch.nn.functional.cross_entropy(net(s0[0], 0), s0[1])
     + torch.nn.functional.cross_entropy(net(s1[0], 1), s1[1])).backward()
    for g, expected in zip(got, net.heads[:2].parameters()):
        torch.testing.assert_close(g, expected.grad)
    # an epoch of task 1, then one of task 2 (of three) with and without replay of task 1's set
    x_train = datasets.to_uint8(torch.rand(600, 3, 32, 32))  # two batches of ≤ 512
    y_train = torch.randint(0, 3, (600,))
    features = []
    for replay in ([], [(*s0, 0)]):
        net = tiny_net()
        optimizer, scheduler = condense.stage_optimizer(net, 0, 10)
        condense.train_continual_epoch(net, optimizer, scheduler, x_train, y_train, 0, [], None,
                                       512)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        optimizer, scheduler = condense.stage_optimizer(net, 1, 10)  # a new task
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert optimized == {id(p) for p in [*net.features.parameters(),
                                             *net.heads[1].parameters()]}
        condense.train_continual_epoch(net, optimizer, scheduler, x_train, y_train, 1, replay,
                                       None, 512)
        after = net.state_dict()
        assert not torch.equal(after["heads.1.weight"], before["heads.1.weight"])
        assert not torch.equal(after["features.0.weight"], before["features.0.weight"])
        for key in ["heads.0.weight", "heads.0.bias", "heads.2.weight", "heads.2.bias"]:
            assert torch.equal(after[key], before[key]), key
        features.append(after["features.0.weight"])
    assert not torch.equal(*features)  # the replayed set reached the shared features


def test_epoch_batches_are_cropped_with_padding_3_and_not_flipped(monkeypatch):
    """An epoch: the training images in random batches (one permutation from the global
    RNG), each cut from its zero-padded copy at offsets drawn in [0, 6], never flipped."""
    x_train, y_train = datasets.to_uint8(torch.rand(20, 3, 32, 32)), torch.randint(0, 3, (20,))
    seen, draws = [], []
    sample = nets.sample_crop_flip

    def spy(n, pad, flip, device):
        draws.append((pad, flip, sample(n, pad, flip, device)))
        return draws[-1][2]
    monkeypatch.setattr(nets, "sample_crop_flip", spy)
    monkeypatch.setattr(condense, "continual_loss", lambda net, x, y, *rest: seen.append(
        (x, y)) or net(x, 0).logsumexp(1).mean())
    net = tiny_net()
    optimizer, scheduler = condense.stage_optimizer(net, 0, 10)
    torch.manual_seed(5)
    condense.train_continual_epoch(net, optimizer, scheduler, x_train, y_train, 0, [], None, 8)
    torch.manual_seed(5)
    batches = torch.randperm(20).split(8)
    assert [len(x) for x, _ in seen] == [8, 8, 4] and len(draws) == 3
    for (x, y), idx, (pad, flip, aug) in zip(seen, batches, draws):
        assert pad == 3 and not flip and not aug[1].any()
        torch.testing.assert_close(x, nets.crop_flip(x_train[idx].float() / 255, aug, 3))
        assert torch.equal(y, y_train[idx])


def test_distillation_targets_come_from_each_kept_tasks_own_teacher():
    """--distill on task 3 (authors): every input (the real batch, each condensed set) adds
    KD with T = 2 on head k against teacher k, the network right after task k (two teachers,
    each perturbed its own way from the student), and each term is divided by 1 + 2:

        ℓ = [CE(h_j(φ(x)), y) + Σ_{k<2} KD(h_k(φ(x)), h^k_k(φ^k(x)))] / 3."""
    net = tiny_net()
    teachers = {}
    for k in (0, 1):
        teachers[k] = condense.frozen_copy(net)
        with torch.no_grad():
            for p in teachers[k].parameters():
                p.add_(0.1 * torch.randn_like(p))
    (x, y), s0, s1 = batch(5, 2, 1), batch(3, 3, 2), batch(4, 4, 3)
    with torch.no_grad():
        expected = 0
        for inputs, labels, head in [(x, y, 2), (*s0, 0), (*s1, 1)]:
            term = cross_entropy(net(inputs, head), labels)
            for k in range(2):
                term = term + soft_cross_entropy(net(inputs, k), teachers[k](inputs, k), 2.0)
            expected = expected + term / 3
        loss = condense.continual_loss(net, x, y, 2, [(*s0, 0), (*s1, 1)], teachers)
        one_teacher = condense.continual_loss(net, x, y, 2, [(*s0, 0), (*s1, 1)],
                                              {0: teachers[1], 1: teachers[1]})
    # the same float32 logits on both sides: only continual_loss's float32 softmaxes and
    # means round (~1e-7 relative, seen 7e-8); the wrong teacher moves it by ~2e-3 relative
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(one_teacher.item() - expected.item()) > 1e-4  # which teacher matters
    assert not any(p.requires_grad for t in teachers.values() for p in t.parameters())
    # distillation alone, with the student as its own teacher: KD = the entropy at T = 2
    logits = torch.randn(6, 5, dtype=torch.float64)
    assert condense.distillation_loss(logits, logits).item() == pytest.approx(
        soft_cross_entropy(logits, logits, 2.0).item(), rel=1e-12)


def test_which_tasks_keep_a_head_and_which_head_scores_each_task():
    """The authors' protocol, written out for three tasks: an earlier task keeps its own
    (frozen) head only when it has a condensed set; one without is scored through the
    current head. --own-heads (ours) keeps every head."""
    # replay of the sets of tasks 1 and 2 (the default): every earlier task keeps its head
    assert [condense.kept_tasks(s, 2) for s in range(3)] == [[], [0], [0, 1]]
    assert condense.scoring_heads(2, [0, 1]) == [0, 1, 2]
    # --no-replay: nothing kept, every task is scored through the newest head
    assert [condense.kept_tasks(s, 0) for s in range(3)] == [[], [], []]
    assert [condense.scoring_heads(s, []) for s in range(3)] == [[0], [1, 1], [2, 2, 2]]
    # --no-replay --own-heads
    assert condense.kept_tasks(2, 0, own_heads=True) == [0, 1]
    assert condense.scoring_heads(2, [0, 1]) == [0, 1, 2]
    # the accuracy of a task is that of the head named for it
    net = tiny_net(classes=(3, 3, 3))
    x, y = datasets.to_uint8(torch.rand(7, 3, 32, 32)), torch.randint(0, 3, (7,))
    task = type("Task", (), dict(name="t", x_test=x, y_test=y))
    other = type("Task", (), dict(name="u", x_test=x, y_test=y))
    with torch.no_grad():
        by_hand = [(net(x.float() / 255, h).argmax(1) == y).float().mean().item()
                   for h in range(3)]
    for heads in ([0, 2], [2, 2], [1, 0]):
        accs = condense.task_accuracies(net, [task, other], heads)
        assert list(accs.values()) == pytest.approx([by_hand[h] for h in heads])


def test_schedule_is_cosine_restarted_every_cycle():
    """SGD(lr 0.1, momentum 0.9, wd 1e-4) and, at iteration i of a stage, the lr
    0.05·(1 + cos(π·(i mod T)/T)) of S11: a smooth decay over a cycle of T iterations,
    back at 0.1 at every restart (not the authors' per-epoch sawtooth)."""
    optimizer, scheduler = condense.stage_optimizer(tiny_net(), 0, 7)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 1e-4, False)
    lrs = []
    for _ in range(3 * 7):
        lrs.append(group["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.05 * (1 + math.cos(math.pi * (i % 7) / 7)) for i in range(21)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_two_class_difference_by_hand():
    """Green where class A is brighter, red where B is, in proportion to |d| of the channel
    means, on the pair's grey average; full colour at |d| ≥ scale."""
    a = torch.tensor([[[1.0, 0.0], [0.4, 0.75]],
                      [[1.0, 0.0], [0.4, 0.75]],
                      [[1.0, 0.0], [0.4, 0.75]]])[None]  # (1, 3, 2, 2)
    b = torch.tensor([[[0.0, 1.0], [0.4, 0.25]],
                      [[0.0, 1.0], [0.4, 0.25]],
                      [[0.0, 1.0], [0.4, 0.25]]])[None]
    mix = condense.two_class_difference(a, b, scale=1.0)
    assert mix.shape == (1, 3, 2, 2)
    assert mix[0, :, 0, 0].tolist() == [0.0, 1.0, 0.0]  # A white, B black: green
    assert mix[0, :, 0, 1].tolist() == [1.0, 0.0, 0.0]  # B brighter: red
    assert mix[0, :, 1, 0].tolist() == pytest.approx([0.4] * 3)  # equal: grey
    assert mix[0, :, 1, 1].tolist() == pytest.approx([0.25, 0.75, 0.25])  # w = 0.5 on grey 0.5
    # colour images: d is the mean over channels; |d| above `scale` is full colour
    a = torch.tensor([0.9, 0.3, 0.3]).view(3, 1, 1)
    b = torch.tensor([0.3, 0.3, 0.3]).view(3, 1, 1)  # d = 0.2, grey = 0.4
    assert condense.two_class_difference(a, b, 0.4).flatten().tolist() == pytest.approx(
        [0.2, 0.7, 0.2])
    assert condense.two_class_difference(b, a, 0.1).flatten().tolist() == pytest.approx(
        [1.0, 0.0, 0.0])


def write_folder(root, images, labels, names, size):
    """An ImageFolder train/ + test/ tree of grayscale PNGs at size×size pixels."""
    for i, (x, y) in enumerate(zip(images, labels.tolist())):
        split = "test" if i % 5 == 0 else "train"
        folder = root / split / names[y]
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(x.mean(0).mul(255).round().byte().numpy(), "L")
        img.resize((size, size)).save(folder / f"{i}.png")


def fake_run(folder, dataset, class_names, ipc=2, shape=(3, 32, 32), seed=0, bpd=6.5,
             **args):
    """The files of a finished condense.py run that --condensed and --compare read."""
    folder.mkdir(parents=True)
    nets.write_json(folder / "args.json", {"dataset": dataset, "lambda_sim": 0.0, **args})
    nets.write_json(folder / "results.json", {"bpd_synthetic": bpd})
    nets.write_json(folder / "made_from.json", {"glow": "f" * 64})
    g = torch.Generator().manual_seed(seed)
    images = torch.round(255 * torch.rand(len(class_names) * ipc, *shape, generator=g)) / 255
    labels = torch.arange(len(class_names)).repeat_interleave(ipc)
    nets.atomic_save({"images": images, "labels": labels, "class_names": list(class_names)},
                     folder / "synthetic.pt")
    return folder


def test_condensed_set_must_fit_its_task(tmp_path):
    """A run of another dataset, with other classes or another image size is refused in
    one sentence (CheckpointError, exit 2 from the command line, no traceback)."""
    shapes = datasets.SHAPES
    good = fake_run(tmp_path / "good", "shapes", shapes)
    images, labels, _ = condense.load_run_images(good, "shapes", shapes, "--condensed")
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    bad = {"missing": tmp_path / "nowhere",
           "dataset": fake_run(tmp_path / "mnist", "mnist", shapes),
           "classes": fake_run(tmp_path / "three", "shapes", shapes[:3]),
           "size": fake_run(tmp_path / "small", "shapes", shapes, shape=(3, 28, 28))}
    for what, run in bad.items():
        with pytest.raises(nets.CheckpointError) as error:
            condense.load_run_images(run, "shapes", shapes, "--condensed")
        message = str(error.value)
        assert "\n" not in message and message.count(". ") == 0, what
    # from the command line: a 5-class run given for a 2-class task
    x, y = datasets.make_shapes(20, seed=5)
    write_folder(tmp_path / "two", x.float() / 255, y % 2, ["a", "b"], 32)
    proc = subprocess.run([sys.executable, "condense.py", "--continual", "--dataset",
                           f"{tmp_path / 'two'},shapes", "--condensed",
                           str(fake_run(tmp_path / "five", "two", shapes)), "--out",
                           str(tmp_path / "out"), "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "5 classes" in proc.stderr and "--condensed" in proc.stderr


def three_tasks(classes=(3, 3, 3)):
    """Three tiny tasks of 8 training and 6 test images each, with their class names."""
    tasks = []
    for i, n in enumerate(classes):
        g = torch.Generator().manual_seed(i)
        tasks.append(argparse.Namespace(
            name=f"task{i + 1}", num_classes=n, class_names=[f"c{c}" for c in range(n)],
            x_train=datasets.to_uint8(torch.rand(8, 3, 32, 32, generator=g)),
            y_train=torch.arange(8) % n, x_test=datasets.to_uint8(torch.rand(6, 3, 32, 32)),
            y_test=torch.arange(6) % n))
    return tasks


@pytest.mark.parametrize("replay, own_heads, distill", [
    (True, False, True), (True, False, False), (False, False, False), (False, True, True)])
def test_three_tasks_use_the_heads_and_teachers_of_the_authors_protocol(
        tmp_path, monkeypatch, replay, own_heads, distill):
    """continual() on three tiny tasks, each term checked against the protocol written out:
    task t replays the condensed set of each kept earlier task j through head j; with
    --distill, kept task k teaches through the network as it was right after task k (not
    the one after the previous stage); after task t a task is scored through its own head
    if kept, else through head t. Kept: the tasks with a condensed set (authors), every
    earlier task with --own-heads."""
    tasks = three_tasks()
    condensed = [batch(3, 3, 10 + j) for j in range(2)] if replay else []
    cfg = argparse.Namespace(cycle_epochs=1, first_cycles=1, train_batch=8, out=tmp_path,
                             distill=distill, own_heads=own_heads, no_replay=not replay)
    seen, scored, after = [], [], {}  # after[t]: the network's state right after task t
    train_epoch, accuracies = condense.train_continual_epoch, condense.task_accuracies

    def recording(net, optimizer, scheduler, x, y, task, replayed, teachers, batch_size):
        seen.append((task, [(xs, ys, j) for xs, ys, j in replayed], dict(teachers)))
        return train_epoch(net, optimizer, scheduler, x, y, task, replayed, teachers, batch_size)

    def scoring(net, tasks_seen, heads):
        after[len(tasks_seen) - 1] = {k: v.clone() for k, v in net.state_dict().items()}
        scored.append(list(heads))
        return accuracies(net, tasks_seen, heads)
    monkeypatch.setattr(condense, "train_continual_epoch", recording)
    monkeypatch.setattr(condense, "task_accuracies", scoring)
    torch.manual_seed(0)
    net = condense.MultiHeadConvNet([3, 3, 3], width=4)
    stage_accs = condense.continual(cfg, net, tasks, condensed, resuming=False)

    kept = [[j for j in range(t) if own_heads or replay] for t in range(3)]  # written out
    assert [task for task, _, _ in seen] == [0, 1, 2]
    for t, (_, replayed, teachers) in enumerate(seen):
        assert [j for _, _, j in replayed] == (kept[t] if replay else [])
        for xs, ys, j in replayed:
            assert xs is condensed[j][0] and ys is condensed[j][1]
        assert sorted(teachers) == (kept[t] if distill else [])
        for k, teacher in teachers.items():  # the network right after task k
            for name, value in teacher.state_dict().items():
                assert torch.equal(value, after[k][name]), (t, k, name)
    assert scored == [[0], [0 if 0 in kept[1] else 1, 1],
                      [0 if 0 in kept[2] else 2, 1 if 1 in kept[2] else 2, 2]]
    assert len(stage_accs) == 3 and list(stage_accs[-1]) == ["task1", "task2", "task3"]


def test_tasks_of_other_classes_need_condensed_sets_or_own_heads():
    """Without condensed sets an earlier task is scored through the current head, which
    only means something when the tasks share their classes: one sentence otherwise."""
    tasks = three_tasks()
    tasks[1].class_names = ["x", "y", "z"]
    with pytest.raises(nets.RunError, match="task task1 is scored through the head of the "
                                            "current task task2 .* pass --own-heads"):
        condense.check_shared_labels(tasks, 0)
    condense.check_shared_labels(tasks, 2)  # replay: every earlier task keeps its head
    condense.check_shared_labels(tasks, 0, own_heads=True)
    condense.check_shared_labels(three_tasks(), 0)  # the same classes: the authors' protocol


def test_flag_combinations_are_checked(capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            condense.get_args(list(argv))
        return e.value.code
    assert error("--distill") == 2 and error("--condensed", "r") == 2  # need --continual
    assert error("--continual", "--dataset", "shapes") == 2  # one task
    assert error("--continual", "--dataset", "shapes,mnist") == 2  # no --condensed
    assert error("--continual", "--dataset", "a,b,c", "--condensed", "r1") == 2  # 1 of 2 runs
    assert error("--continual", "--dataset", "a,b", "--condensed", "r1", "--no-replay") == 2
    # condensation-only flags do nothing with --continual, even at their default value
    for flag in (["--ipc", "10"], ["--iterations", "5"], ["--glow", "/nonexistent.pt"],
                 ["--lambda-sim", "50"], ["--batch-size", "256"]):
        assert error("--continual", "--dataset", "a,b", "--no-replay", *flag) == 2
        assert f"{flag[0]} (only without --continual) does nothing" in capsys.readouterr().err
    # the authors' runs without condensed sets keep no head and no teacher (Fig. S8)
    for argv, words in ((["--condensed", "r1", "--own-heads"], "--own-heads (only with --no-"),
                        (["--no-replay", "--distill"], "--distill (only with --condensed or "
                                                       "--own-heads)"),
                        (["--summarize", "r", "--no-replay"], "--dataset, --no-replay (only "
                                                              "without --summarize)")):
        assert error("--continual", "--dataset", "a,b", *argv) == 2
        assert words in capsys.readouterr().err
    args = condense.get_args(["--continual", "--dataset", "a,b", "--no-replay", "--own-heads",
                              "--distill"])
    assert args.own_heads and args.distill
    assert condense.get_args(["--continual", "--summarize", "runs/s9"]).summarize == ["runs/s9"]
    assert error("--cycle-epochs", "50") == 2  # needs --continual
    args = condense.get_args(["--continual", "--dataset", "shapes,x/digits", "--no-replay",
                              "--own-heads", "--distill", "--quick"])
    cfg = condense.resolve_config(args)
    assert (cfg.width, cfg.cycle_epochs, cfg.first_cycles, cfg.train_size, cfg.train_batch) == (
        32, 5, 2, 2000, 128)
    assert str(cfg.out) == ("runs/condense-continual-shapes-digits-noreplay-ownheads-distill-"
                            "seed0-quick")
    cfg = condense.resolve_config(condense.get_args(["--continual", "--dataset", "svhn,mnist,usps",
                                                     "--condensed", "r1,r2"]))
    assert (cfg.width, cfg.cycle_epochs, cfg.first_cycles, cfg.train_size, cfg.train_batch) == (
        128, 50, 3, None, 512)  # S11 and the authors' code
    assert str(cfg.out) == "runs/condense-continual-svhn-mnist-usps-replay-seed0"


def continual_run(tmp_path, out, *extra):
    """Shapes, then its colour-inverted copy (an ImageFolder of 32×32 PNGs), replaying a
    made-up condensed set of shapes, with distillation; 6 + 2 epochs of 2 steps each."""
    second = tmp_path / "inverted"
    if not second.exists():
        x, y = datasets.make_shapes(100, seed=3)
        write_folder(second, 1 - x.float() / 255, y, datasets.SHAPES, 32)
    run = tmp_path / "cond-shapes"
    if not run.exists():
        fake_run(run, "shapes", datasets.SHAPES)
    argv = ["--continual", "--dataset", f"shapes,{second}", "--condensed", str(run),
            "--distill", "--train-size", "600", "--test-size", "50", "--width", "4",
            "--cycle-epochs", "2", "--device", "cpu", "--out", str(tmp_path / out), *extra]
    return condense.main(condense.get_args(argv))


def test_continual_smoke_schedule_teacher_and_resume(tmp_path, monkeypatch):
    """A tiny run: per-epoch lr of the restarted cosine (2 steps per epoch, cycles of 2
    epochs); the teacher of task 2 is the network after task 1; results, metrics and
    accuracy.png; and the same numbers when interrupted (mid-task 1, mid-task 2) and resumed."""
    calls = []
    train_epoch = condense.train_continual_epoch

    def recording(net, optimizer, scheduler, x, y, task, replay, teachers, batch_size):
        assert batch_size == 512
        state = {k: v.clone() for k, v in net.state_dict().items()}
        calls.append((task, len(replay), dict(teachers), state))
        return train_epoch(net, optimizer, scheduler, x, y, task, replay, teachers, batch_size)
    monkeypatch.setattr(condense, "train_continual_epoch", recording)
    results = continual_run(tmp_path, "a")
    assert [(task, n) for task, n, _, _ in calls] == [(0, 0)] * 6 + [(1, 1)] * 2
    assert all(not teachers for _, _, teachers, _ in calls[:6])
    assert list(calls[6][2]) == [0]
    teacher = calls[6][2][0]
    assert calls[7][2][0] is teacher
    for key, value in teacher.state_dict().items():  # the network after task 1
        assert torch.equal(value, calls[6][3][key]), key
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    cosine = [0.1, 0.05]  # lr at the first step of each epoch of a cycle: i = 0, 2 of T = 4
    assert [r["lr"] for r in rows] == pytest.approx(cosine * 4, abs=1e-12)
    assert [(r["stage"], r["epoch"]) for r in rows] == [(1, e) for e in range(1, 7)] + [
        (2, 1), (2, 2)]
    assert [list(r.get("test_acc", {})) for r in rows if "test_acc" in r] == [
        ["shapes"], ["shapes", "inverted"]]
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["replayed"] == [dict(task="shapes", run=str(tmp_path / "cond-shapes"), bpd=6.5,
                                      glow="f" * 64)] and saved["replayed_bpd"] == 6.5
    assert saved["scored_through"] == {"shapes": "shapes", "inverted": "inverted"}
    assert saved["stage_test_acc"] == [rows[5]["test_acc"], rows[7]["test_acc"]]
    assert saved["final_mean_acc"] == pytest.approx(sum(rows[7]["test_acc"].values()) / 2)
    assert saved == json.loads(json.dumps(results))
    assert (tmp_path / "a" / "accuracy.png").is_file()

    # interrupted in task 1 after 1 epoch, at its end, in task 2 after 1 epoch; resumed each time
    for i, stop in enumerate((1, 5, 1)):
        count = [0]

        def interrupted(*a, stop=stop):
            count[0] += 1
            if count[0] > stop:
                raise KeyboardInterrupt
            return train_epoch(*a)
        monkeypatch.setattr(condense, "train_continual_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            continual_run(tmp_path, "b", *(["--resume"] if i else []))
    monkeypatch.setattr(condense, "train_continual_epoch", train_epoch)
    assert continual_run(tmp_path, "b", "--resume") == results
    resumed = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    final = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    for key, value in final["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    rows_b = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [{**r, "seconds": 0} for r in rows_b] == [{**r, "seconds": 0} for r in rows]


def test_fig_s9_summary_draws_final_accuracy_against_the_replayed_sets_bpd(tmp_path,
                                                                          monkeypatch):
    """Three continual runs replaying sets of 8.0 and 4.5 bpd, with and without
    distillation; `--continual --summarize` draws one series per distillation setting,
    final mean accuracy against replayed_bpd, and a --no-replay run (no bpd) is not drawn."""
    second = tmp_path / "inverted"
    x, y = datasets.make_shapes(60, seed=3)
    write_folder(second, 1 - x.float() / 255, y, datasets.SHAPES, 32)
    grid, finals = tmp_path / "s9", {}
    for name, bpd, extra in (("lam0", 8.0, []), ("lam50", 4.5, []),
                             ("lam50-kd", 4.5, ["--distill"]),
                             ("none", None, ["--no-replay", "--own-heads"])):
        replay = [] if bpd is None else ["--condensed", str(fake_run(
            tmp_path / f"cond-{name}", "shapes", datasets.SHAPES, bpd=bpd, seed=len(finals)))]
        results = condense.main(condense.get_args([
            "--continual", "--dataset", f"shapes,{second}", *replay, *extra, "--train-size",
            "60", "--test-size", "20", "--width", "4", "--cycle-epochs", "1", "--device", "cpu",
            "--out", str(grid / name)]))
        finals[name] = results["final_mean_acc"]
        assert results.get("replayed_bpd") == bpd
    drawn = {}
    monkeypatch.setattr(nets, "draw_tradeoff", lambda path, lines, *a, **k: drawn.update(
        path=path, lines=lines))
    monkeypatch.setattr(sys, "argv", ["condense.py", "--continual", "--summarize", str(grid)])
    runpy.run_path(condense.__file__, run_name="__main__")
    assert [(label, [(x, y) for x, y, _ in points]) for label, points in drawn["lines"]] == [
        ("replay", [(4.5, finals["lam50"]), (8.0, finals["lam0"])]),
        ("replay + distillation", [(4.5, finals["lam50-kd"])])]
    assert drawn["path"] == grid / "tradeoff.png" and (grid / "tradeoff.csv").is_file()


def test_two_class_view_with_compare(tmp_path, monkeypatch):
    """A two-class ImageFolder of 40×40 grayscale PNGs (resized, repeated to RGB) writes
    two_class.png; with --compare the earlier run's pairs come first, each row [A_k, B_k,
    two_class_difference(A_k, B_k)] on one colour scale, the largest |d| of the figure.
    A --compare run of another dataset, or --compare on five classes, is refused."""
    x, y = datasets.make_shapes(40, seed=4)
    write_folder(tmp_path / "xray", x.float() / 255, y % 2, ["effusion", "normal"], 40)
    glow.save_glow(glow.Glow(levels=1, steps=1, hidden=8), tmp_path / "glow.pt")

    def run(out, *extra, dataset=str(tmp_path / "xray")):
        argv = ["--dataset", dataset, "--ipc", "2", "--iterations", "1", "--batch-real", "4",
                "--width", "4", "--num-eval", "1", "--eval-epochs", "1", "--train-size", "20",
                "--glow", str(tmp_path / "glow.pt"), "--device", "cpu",
                "--out", str(tmp_path / out), *extra]
        return condense.main(condense.get_args(argv))
    run("plain", "--lambda-sim", "0")
    assert Image.open(tmp_path / "plain" / "two_class.png").size == (3 * 98 + 2, 2 * 112 + 2)
    grids = {}
    monkeypatch.setattr(datasets, "save_image_grid", lambda images, path, nrow, captions:
                        grids.setdefault(Path(path).name, (images, nrow, captions)))
    run("simple", "--lambda-sim", "1", "--compare", str(tmp_path / "plain"))
    tiles, nrow, captions = grids["two_class.png"]
    assert nrow == 3 and tiles.shape == (12, 3, 32, 32)  # 2 runs × 2 pairs × 3 tiles
    plain = torch.load(tmp_path / "plain" / "synthetic.pt", weights_only=True)["images"]
    simple = torch.load(tmp_path / "simple" / "synthetic.pt", weights_only=True)["images"]
    a, b = torch.cat([plain[:2], simple[:2]]), torch.cat([plain[2:], simple[2:]])  # class-major
    scale = (a - b).mean(1).abs().max()
    expected = torch.stack([a, b, condense.two_class_difference(a, b, scale)], 1).flatten(0, 1)
    torch.testing.assert_close(tiles, expected)
    assert [c.split()[-1] for c in captions[:2] + captions[6:8]] == ["lam0", "lam0", "lam1", "lam1"]
    assert captions[:3] == ["effusion lam0", "normal lam0", "g:effusion r:normal"]
    # --green-red chooses which class is green (A, first) and which red (B): here swapped
    grids.clear()
    run("swapped", "--lambda-sim", "1", "--green-red", "normal,effusion", "--compare",
        str(tmp_path / "plain"))
    tiles, _, captions = grids["two_class.png"]
    swapped = torch.load(tmp_path / "swapped" / "synthetic.pt", weights_only=True)["images"]
    a, b = torch.cat([plain[2:], swapped[2:]]), torch.cat([plain[:2], swapped[:2]])
    scale = (a - b).mean(1).abs().max()
    expected = torch.stack([a, b, condense.two_class_difference(a, b, scale)], 1).flatten(0, 1)
    torch.testing.assert_close(tiles, expected)
    assert captions[:3] == ["normal lam0", "effusion lam0", "g:normal r:effusion"]
    for wrong in ("normal", "normal,cat", "normal,normal"):
        with pytest.raises(nets.RunError, match="--green-red needs the two classes, the green "
                                                "one first: effusion,normal or normal,effusion"):
            run("wrong", "--green-red", wrong)
    with pytest.raises(nets.RunError, match="--green-red is for Fig. 7 of two classes"):
        run("five", "--green-red", "disk,ring", dataset="shapes")
    nets.write_json(tmp_path / "plain" / "args.json", {"dataset": "mnist"})
    with pytest.raises(nets.CheckpointError, match="--compare"):
        run("other", "--compare", str(tmp_path / "plain"))
    with pytest.raises(nets.RunError, match="two classes"):
        run("five", "--compare", str(tmp_path / "plain"), dataset="shapes")
