"""How runs behave where users run them: the device every model lands on, output folders
that are never mixed, --resume that checks its settings, and bad input, interrupts and
corrupt files answered with one sentence. Tiny settings throughout (seconds each)."""
import csv
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import condense
import datasets
import glow
import nets
import per_instance
import posthoc

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_glow_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("glow") / "tiny.pt"
    torch.manual_seed(0)
    glow.save_glow(glow.Glow(levels=1, steps=1, hidden=8), path)
    return str(path)


def per_instance_argv(out, glow_path, *extra):
    return ["--dataset", "shapes", "--train-size", "32", "--test-size", "16", "--epochs", "1",
            "--batch-size", "16", "--arch", "convnet", "--width", "4", "--ngf", "2",
            "--glow", glow_path, "--device", "cpu", "--out", str(out), *extra]


def condense_argv(out, glow_path, *extra):
    return ["--dataset", "shapes", "--train-size", "60", "--test-size", "40", "--ipc", "1",
            "--batch-real", "8", "--width", "8", "--num-eval", "1", "--eval-epochs", "1",
            "--iterations", "2", "--lambda-sim", "1", "--glow", glow_path, "--device", "cpu",
            "--out", str(out), *extra]


def posthoc_argv(out, glow_path, *extra):
    trains_f = [] if "--classifier" in extra else ["--train-epochs", "1", "--depth", "10",
                                                   "--widen", "1"]  # these act only then
    return ["--dataset", "shapes", "--train-size", "64", "--test-size", "40", "--steps", "2",
            "--num-images", "2", "--log-every", "1", *trains_f, "--glow", glow_path,
            "--device", "cpu", "--out", str(out), *extra]


SCRIPTS = {"per_instance": (per_instance, per_instance_argv, "--lambda-sim", "5"),
           "condense": (condense, condense_argv, "--lambda-sim", "5"),
           "posthoc": (posthoc, posthoc_argv, "--lambda-sim", "5")}


def run(module, argv):
    return module.main(module.get_args(argv))


def snapshot(folder):
    """{relative path: sha256} of every file below folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def all_devices(*modules):
    return {t.device.type for m in modules for t in [*m.parameters(), *m.buffers()]}


# ----------------------------------------------------------------------------- devices
def test_load_glow_and_get_glow_put_every_tensor_on_the_requested_device(tmp_path, tiny_glow_path):
    """`meta` stands in for a GPU: a model left on the CPU shows up as device "cpu"."""
    meta = torch.device("meta")
    assert all_devices(glow.load_glow(tiny_glow_path, meta)) == {"meta"}
    assert all_devices(glow.load_glow(tiny_glow_path, meta, frozen=False)) == {"meta"}
    assert all_devices(glow.get_glow(tiny_glow_path, False, None, None, meta)) == {"meta"}
    # a cached quick Glow takes the same path
    made_from = dict(dataset="shapes", train_size=10, seed=0)
    cache = tmp_path / "cached.pt"
    glow.save_glow(glow.load_glow(tiny_glow_path, frozen=False), cache, made_from=made_from)
    cached = glow.get_glow(None, True, None, str(cache), meta, made_from, log=lambda *a: None)
    assert all_devices(cached) == {"meta"}


@pytest.mark.filterwarnings("ignore:.*meta parameter")  # loading into meta copies nothing
def test_classifier_checkpoints_and_resume_land_on_the_device(tmp_path):
    clf = nets.ConvNet(3, width=4)
    nets.save_model(clf, tmp_path / "clf.pt", dataset="shapes")
    assert all_devices(nets.load_model(tmp_path / "clf.pt", map_location="meta")) == {"meta"}
    # per_instance's --resume: optimizer moments restored onto the models' device
    simplifier = nets.UNetSimplifier(num_down=5, ngf=2)
    opt_clf = nets.classifier_optimizer(clf)
    opt_simp = torch.optim.Adam(simplifier.parameters())
    x = torch.rand(2, 3, 32, 32)
    torch.nn.functional.cross_entropy(clf(simplifier(x)), torch.tensor([0, 1])).backward()
    opt_clf.step()
    opt_simp.step()
    models = dict(classifier=clf, simplifier=simplifier)
    optimizers = dict(opt_clf=opt_clf, opt_simp=opt_simp)
    per_instance.save_checkpoint(tmp_path / "ck.pt", 1, models, optimizers, [], 0,
                                 dict(dataset="shapes"))
    meta_models = {k: type(m)(**m.config).to("meta") for k, m in models.items()}
    meta_opts = dict(opt_clf=nets.classifier_optimizer(meta_models["classifier"]),
                     opt_simp=torch.optim.Adam(meta_models["simplifier"].parameters()))
    per_instance.load_checkpoint(tmp_path / "ck.pt", meta_models, meta_opts)
    assert all_devices(*meta_models.values()) == {"meta"}
    states = [t for opt in meta_opts.values() for s in opt.state.values()
              for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert states and {t.device.type for t in states} == {"meta"}


# ----------------------------------------------------------------------------- output folders
def test_default_out_names_every_result_changing_setting():
    a = per_instance.resolve_config(per_instance.get_args(["--dataset", "shapes", "--seed", "1"]))
    b = per_instance.resolve_config(per_instance.get_args(["--dataset", "shapes", "--seed", "2"]))
    q = per_instance.resolve_config(per_instance.get_args(["--dataset", "shapes", "--quick"]))
    blur = per_instance.resolve_config(per_instance.get_args(
        ["--dataset", "shapes", "--simplifier", "blur", "--blur-sigma", "1.5"]))
    assert len({a.out, b.out, q.out}) == 3 and "seed1" in str(a.out) and "lam2" in str(a.out)
    assert "sigma1.5" in str(blur.out)
    c1 = condense.resolve_config(condense.get_args(["--seed", "1", "--ipc", "1", "--lambda-sim", "3"]))
    c2 = condense.resolve_config(condense.get_args(["--seed", "2", "--ipc", "1", "--lambda-sim", "3"]))
    assert c1.out != c2.out and "ipc1" in str(c1.out) and "lam3" in str(c1.out)
    p1 = posthoc.resolve_config(posthoc.get_args(["--seed", "1"]))
    p2 = posthoc.resolve_config(posthoc.get_args(["--seed", "2"]))
    assert p1.out != p2.out


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_rerun_without_resume_is_refused_and_resume_checks_settings(tmp_path, tiny_glow_path, name):
    module, argv, flag, other = SCRIPTS[name]
    out = tmp_path / "run"
    run(module, argv(out, tiny_glow_path))
    before = snapshot(out)
    assert {"args.json", "results.json", "metrics.jsonl"} <= set(before)
    with pytest.raises(nets.RunError, match="already holds a run"):
        run(module, argv(out, tiny_glow_path))  # the same command again
    with pytest.raises(nets.RunError, match="other settings.*lambda-sim"):
        run(module, argv(out, tiny_glow_path, "--resume", flag, other))
    with pytest.raises(nets.RunError, match="other settings.*seed"):
        run(module, argv(out, tiny_glow_path, "--resume", "--seed", "3"))
    assert snapshot(out) == before  # not one byte of the earlier run changed


@pytest.mark.parametrize("name, flag", [("per_instance", "--epochs"), ("condense", "--iterations")])
def test_a_resume_never_shortens_a_finished_run(tmp_path, tiny_glow_path, name, flag):
    module, argv = SCRIPTS[name][:2]
    out = tmp_path / "run"
    run(module, argv(out, tiny_glow_path, flag, "2"))
    before = snapshot(out)
    with pytest.raises(nets.RunError, match=f"finished run of {flag[2:]} 2, more than 1"):
        run(module, argv(out, tiny_glow_path, "--resume", flag, "1"))
    assert snapshot(out) == before  # results.json and args.json as they were


def test_resume_rewrites_metrics_without_duplicates_and_removes_stale_temp_files(
        tmp_path, tiny_glow_path):
    out = tmp_path / "c"
    run(condense, condense_argv(out, tiny_glow_path))
    # a run killed after its last checkpoint: a row the checkpoint does not know, and a
    # temporary file of an atomic save that never finished
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 3, "loss": 1.0}) + "\n")
    (out / ".tmp-checkpoint.ptabc").write_bytes(b"half")
    run(condense, condense_argv(out, tiny_glow_path, "--resume", "--iterations", "4"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["iteration"] for r in rows if "loss" in r]
    evals = [r["iteration"] for r in rows if "test_acc_mean" in r]
    assert steps == [1, 2, 3, 4] and evals == [0, 2, 4]
    assert [r for r in rows if r["iteration"] == 3][0]["loss"] != 1.0
    assert not list(out.glob(".tmp-*"))


def test_condense_never_writes_an_evaluation_twice(tmp_path, tiny_glow_path, monkeypatch):
    out = tmp_path / "c"
    run(condense, condense_argv(out, tiny_glow_path, "--eval-at", "0,2"))
    # resumed with more iterations: the evaluation at 2 is not repeated
    run(condense, condense_argv(out, tiny_glow_path, "--eval-at", "0,2", "--iterations", "4",
                                "--resume"))
    # killed during its final evaluation, then resumed: that evaluation once
    real, calls = condense.evaluate_synset, []

    def killed_at_the_end(*a, **k):
        calls.append(1)
        if len(calls) == 1:  # the evaluation at 6, the first of this run
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(condense, "evaluate_synset", killed_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        run(condense, condense_argv(out, tiny_glow_path, "--eval-at", "0,2", "--iterations", "6",
                                    "--resume"))
    monkeypatch.setattr(condense, "evaluate_synset", real)
    results = run(condense, condense_argv(out, tiny_glow_path, "--eval-at", "0,2",
                                          "--iterations", "6", "--resume"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "test_acc_mean" in r] == [0, 2, 4, 6]
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert results["test_accs"] == [r for r in rows if r.get("iteration") == 6
                                    and "test_accs" in r][0]["test_accs"]


def test_cached_quick_glow_and_classifier_of_other_data_are_refused(tmp_path, tiny_glow_path):
    cache = tmp_path / "quick.pt"
    model = glow.load_glow(tiny_glow_path, frozen=False)
    glow.save_glow(model, cache, made_from=dict(dataset="mnist", train_size=2000, seed=0))
    with pytest.raises(glow.GlowCheckpointError, match="pretrained on"):
        glow.get_glow(None, True, None, str(cache), "cpu",
                      dict(dataset="shapes", train_size=2000, seed=0), log=lambda *a: None)
    # two runs on other data never share a cache file
    paths = {glow.quick_glow_path(tmp_path / "run", dict(dataset=d, train_size=n, seed=s))
             for d, n, s in [("shapes", 2000, 0), ("mnist", 2000, 0), ("shapes", 500, 0),
                             ("shapes", 2000, 1)]}
    assert len(paths) == 4
    clf = tmp_path / "clf.pt"
    nets.save_model(nets.ConvNet(5, width=4), clf, dataset="cifar-stripes")
    with pytest.raises(nets.CheckpointError, match="made for dataset 'cifar-stripes'"):
        run(posthoc, posthoc_argv(tmp_path / "p", tiny_glow_path, "--classifier", str(clf)))
    assert not (tmp_path / "p").exists()  # refused before anything was written


def test_at_lambda_0_the_glow_file_does_not_change_what_a_run_learns(tmp_path, tiny_glow_path):
    other = tmp_path / "other.pt"
    torch.manual_seed(5)
    glow.save_glow(glow.Glow(levels=2, steps=2, hidden=4), other)  # another size and weights
    results = [run(condense, condense_argv(tmp_path / name, path, "--lambda-sim", "0"))
               for name, path in (("a", tiny_glow_path), ("b", str(other)))]
    assert results[0]["test_accs"] == results[1]["test_accs"]
    a, b = (torch.load(tmp_path / name / "synthetic.pt", weights_only=True) for name in "ab")
    assert torch.equal(a["images"], b["images"])


def test_resume_with_other_data_or_another_glow_file_behind_the_same_flags_is_refused(
        tmp_path, tiny_glow_path):
    from test_datasets import fake_mnist_root
    for root, seed in (("A", 0), ("B", 1)):
        fake_mnist_root(tmp_path / root, n_train=40, n_test=20, seed=seed)
    glow_file = tmp_path / "g.pt"
    glow_file.write_bytes(Path(tiny_glow_path).read_bytes())

    def argv(out, root, *extra):
        return per_instance_argv(out, str(glow_file), "--dataset", "mnist", "--data-root",
                                 str(tmp_path / root), *extra)
    out = tmp_path / "r"
    run(per_instance, argv(out, "A"))
    started = snapshot(out)
    with pytest.raises(nets.RunError, match=r"--resume: .* made from other data .*train data"):
        run(per_instance, argv(out, "B", "--resume", "--epochs", "2"))
    assert snapshot(out) == started  # args.json and everything else as they were
    (tmp_path / "C").mkdir()  # the same files under another root are the same data
    (tmp_path / "A" / "MNIST").rename(tmp_path / "C" / "MNIST")
    run(per_instance, argv(out, "C", "--resume", "--epochs", "2"))
    assert json.loads((out / "results.json").read_text())["epochs"] == 2
    # another Glow file behind the same --glow
    torch.manual_seed(1)
    glow.save_glow(glow.Glow(levels=1, steps=1, hidden=8), glow_file)
    with pytest.raises(nets.RunError, match=r"made from other .*glow [0-9a-f]{16} -> "):
        run(per_instance, argv(out, "C", "--resume", "--epochs", "3"))


def test_caches_and_classifiers_are_matched_by_content_not_by_folder_name(tmp_path,
                                                                          monkeypatch):
    v1, v2 = (red_shapes_folder(tmp_path / v / "imgs") for v in ("v1", "v2"))
    (Path(v2) / "train" / "disk" / "0.png").write_bytes(
        (Path(v2) / "train" / "disk" / "1.png").read_bytes())  # one image differs
    cache_paths = []
    monkeypatch.setattr(glow, "get_glow",
                        lambda path, quick, data, cache, *a, **k: cache_paths.append(cache))
    for folder in (v1, v2):
        cfg = posthoc.resolve_config(posthoc.get_args(["--dataset", folder, "--quick", "--out",
                                                       str(tmp_path / "runs" / "p")]))
        train_set, test_set = datasets.load_splits(folder, "data", None, None, 0)
        glow.glow_for_run(cfg, train_set, test_set, "cpu")
    assert len(set(cache_paths)) == 2 and all("imgs" in Path(p).name for p in cache_paths)
    clf = tmp_path / "clf.pt"
    train_v1 = datasets.load_dataset(v1)
    nets.save_model(nets.ConvNet(2, width=4), clf, **datasets.identity(train_v1))
    with pytest.raises(nets.CheckpointError, match="made for data '[0-9a-f]{16}', not"):
        run(posthoc, ["--dataset", v2, "--quick", "--classifier", str(clf), "--device", "cpu",
                      "--out", str(tmp_path / "p2")])


def test_posthoc_checks_a_given_classifier_before_the_quick_glow_is_trained(tmp_path,
                                                                            monkeypatch):
    clf = tmp_path / "clf.pt"
    nets.save_model(nets.ConvNet(5, width=4), clf, dataset="cifar-stripes")
    monkeypatch.setattr(glow, "train_glow", lambda *a, **k: pytest.fail("Glow was trained"))
    with pytest.raises(nets.CheckpointError, match="made for dataset 'cifar-stripes'"):
        run(posthoc, ["--dataset", "shapes", "--quick", "--classifier", str(clf), "--device",
                      "cpu", "--out", str(tmp_path / "p")])
    assert not (tmp_path / "quick-glow").exists()


def test_one_random_state_saves_and_restores_python_numpy_torch_and_every_cuda_device(
        tmp_path, monkeypatch):
    import random
    # a stand-in for two CUDA devices: the suite runs where no GPU exists
    devices = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    nets.seed_everything(3)
    nets.atomic_save(dict(rng=nets.rng_state()), tmp_path / "ckpt.pt")

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))
    first = draws()
    nets.seed_everything(4)  # elsewhere in between
    nets.set_rng_state(nets.read_checkpoint(tmp_path / "ckpt.pt", "a checkpoint", "")["rng"])
    assert draws() == first
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, devices))


def test_one_checkpoint_pair_restores_modules_optimizers_schedulers_tensors_and_draws(tmp_path):
    def make():
        net = torch.nn.Linear(3, 2)
        opt = torch.optim.Adam(net.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        return net, opt, sched, torch.zeros(4, 2)
    net, opt, sched, alpha = make()
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    sched.step()
    alpha += 7
    nets.save_state(tmp_path / "c.pt", dict(net=net, opt=opt, sched=sched, alpha=alpha, teacher=None),
                    epoch=3)
    after = torch.rand(3)  # what an uninterrupted run draws next
    net2, opt2, sched2, alpha2 = make()
    ckpt = nets.load_state(tmp_path / "c.pt", "a test checkpoint",
                           dict(net=net2, opt=opt2, sched=sched2, alpha=alpha2), keys=("epoch",))
    assert ckpt["epoch"] == 3 and ckpt["teacher"] is None and torch.equal(torch.rand(3), after)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                  net2.state_dict().values()))
    assert opt2.state_dict()["state"][0]["step"] == 1 and sched2.get_last_lr() == [0.05]
    assert torch.equal(alpha2, alpha)
    # parts that do not fit, and a file of another kind, are one sentence
    with pytest.raises(nets.CheckpointError, match="the alpha in .* other settings"):
        nets.load_state(tmp_path / "c.pt", "a test checkpoint", dict(alpha=torch.zeros(5, 2)))
    with pytest.raises(nets.CheckpointError, match="the net in .* other settings"):
        nets.load_state(tmp_path / "c.pt", "a test checkpoint", dict(net=torch.nn.Linear(3, 4)))
    with pytest.raises(nets.CheckpointError, match="is not a test checkpoint"):
        nets.load_state(tmp_path / "c.pt", "a test checkpoint", dict(model=net2))


def test_one_settings_rule_for_resume_and_grids():
    stored = dict(lambda_sim=1.0, epochs=2, out="a", device="cpu", seed=0)
    assert nets.check_settings("x", stored, dict(stored, out="b", device="cuda"), ("epochs",)) == []
    assert nets.check_settings("x", stored, dict(stored, epochs=5), ("epochs",)) == ["epochs"]
    with pytest.raises(nets.RunError, match=r"x holds a run of other settings \(--seed 0 -> 1\)"):
        nets.check_settings("x", stored, dict(stored, seed=1, epochs=5), ("epochs",))
    with pytest.raises(nets.RunError, match="--epochs 2 -> 5"):
        nets.check_settings("x", stored, dict(stored, epochs=5))  # may not grow here


def test_metrics_rows_wait_for_their_tensors_only_when_asked(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = nets.Metrics(path, [{"epoch": 0}])
    log({"epoch": 1, "loss": torch.tensor(0.5)}, wait=True)
    assert path.read_text().count("\n") == 1  # not read yet
    log({"epoch": 2, "loss": torch.tensor(float("nan")), "bpd": math.inf})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"epoch": 0}, {"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": None, "bpd": None}]
    log({"epoch": 3, "loss": torch.tensor(1.0)}, wait=True)
    assert log.rows[-1] == {"epoch": 3, "loss": 1.0} and len(path.read_text().splitlines()) == 4


def test_a_full_disk_is_one_sentence_and_leaves_no_temporary_file(tmp_path, tiny_glow_path,
                                                                  monkeypatch):
    import errno
    real = os.replace

    def full(src, dst):
        if str(dst).endswith("checkpoint.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)
    monkeypatch.setattr(nets.os, "replace", full)
    out = tmp_path / "r"
    with pytest.raises(nets.RunError) as error:
        run(per_instance, per_instance_argv(out, tiny_glow_path))
    message = str(error.value)
    assert message.startswith(f"could not write {out / 'checkpoint.pt'} (No space left on device)")
    assert "--resume continues" in message and "\n" not in message
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_resume_of_a_folder_without_a_run_is_one_sentence(tmp_path, tiny_glow_path, name):
    module, argv, *_ = SCRIPTS[name]
    out = tmp_path / "none"  # a typo of the run's folder must not start it over
    with pytest.raises(nets.RunError, match=f"--resume: {out} holds no run to continue"):
        run(module, argv(out, tiny_glow_path, "--resume"))
    assert not out.exists()
    out.mkdir()
    for text in ("[1, 2]", '"text"', '{"seed": '):  # args.json that is not a JSON object
        (out / "args.json").write_text(text)
        with pytest.raises(nets.RunError, match=f"{out / 'args.json'} is unreadable"):
            run(module, argv(out, tiny_glow_path, "--resume"))


def test_glow_train_resume_of_a_missing_checkpoint_is_one_sentence(tmp_path):
    out = tmp_path / "g.pt"
    with pytest.raises(nets.RunError, match="does not exist, so there is no run"):
        glow.main(glow.get_args(["train", "--dataset", "shapes", "--resume", "--device", "cpu",
                                 "--out", str(out)]))


def test_an_out_that_cannot_be_a_folder_is_one_sentence_in_every_script(tmp_path,
                                                                        tiny_glow_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for module, argv, *_ in SCRIPTS.values():
        for out, words in ((a_file, "is a file, not a folder"),
                           (a_file / "sub", "cannot be a folder"), ("/proc/x", "cannot be")):
            with pytest.raises(nets.RunError, match=f"--out {out} {words}"):
                run(module, argv(out, tiny_glow_path))
    glow_argv = ["train", "--dataset", "shapes", "--device", "cpu", "--out"]
    with pytest.raises(nets.RunError, match="is a folder; give the checkpoint file"):
        glow.main(glow.get_args(glow_argv + [str(tmp_path)]))
    with pytest.raises(nets.RunError, match="--out's folder .* is a file, not a folder"):
        glow.main(glow.get_args(glow_argv + [str(a_file / "g.pt")]))


@pytest.mark.parametrize("config", [dict(in_channels=1), dict(image_size=16),
                                    dict(image_size=64)])
def test_a_glow_of_other_images_is_refused_before_a_run_starts(tmp_path, config):
    path = tmp_path / "other.pt"
    model = glow.Glow(levels=2, steps=1, hidden=4, **config)
    glow.save_glow(model, path)
    c, size = model.config["in_channels"], model.config["image_size"]
    for module, argv, *_ in SCRIPTS.values():
        out = tmp_path / module.__name__
        with pytest.raises(glow.GlowCheckpointError,
                           match=f"{path} models {c}×{size}×{size} images, but the images to "
                                 "score are 3×32×32; give a Glow of such images"):
            run(module, argv(out, str(path)))
        assert not (out / "args.json").exists()
    y0ast = {k: v for k, v in model.state_dict().items() if not k.endswith(".initialized")}
    with pytest.raises(glow.GlowCheckpointError, match=f"models {c}×{size}×{size} images"):
        glow.import_y0ast(y0ast)  # a y0ast Glow of such images is not imported either


def test_advice_on_too_few_images_names_what_the_user_can_change(tmp_path, tiny_glow_path,
                                                                  monkeypatch):
    # --quick: the tiny Glow's batch of 64, which no flag sets, is named as such
    out = tmp_path / "quick"
    argv = ["--dataset", "shapes", "--quick", "--train-size", "40", "--batch-size", "8",
            "--device", "cpu", "--out", str(out)]
    with pytest.raises(nets.RunError, match="--quick pretrains its tiny Glow in batches of 64 "
                                            "training images, more than the 40 here"):
        run(per_instance, argv)
    assert not (out / "args.json").exists()
    # no --train-size given: "raise --train-size" would be no advice at all
    folder = tmp_path / "few"
    for split, n in (("train", 6), ("test", 4)):
        for c in ("a", "b"):
            (folder / split / c).mkdir(parents=True)
            for i in range(n // 2):
                Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(folder / split / c / f"{i}.png")
    argv = ["--dataset", str(folder), "--batch-size", "16", "--glow", tiny_glow_path,
            "--device", "cpu", "--out", str(tmp_path / "few-run")]
    with pytest.raises(nets.RunError, match="training images; lower it or add images"):
        run(per_instance, argv)
    with pytest.raises(nets.RunError, match="training images; lower it or raise --train-size"):
        run(per_instance, argv + ["--train-size", "5"])
    x, y = torch.zeros(5, 3, 32, 32), torch.tensor([0, 0, 0, 1, 1])
    info = datasets.load_dataset(str(folder)).info
    with pytest.raises(nets.RunError, match="lower --ipc or add training images of it"):
        condense.by_class(x, y, info, 3, "cpu")
    with pytest.raises(nets.RunError, match="lower --ipc or raise --train-size"):
        condense.by_class(x, y, info, 3, "cpu", train_size=5)


@pytest.mark.parametrize("module, argv, flag", [
    (per_instance, ["--blur-sigma", "2"], "--blur-sigma (only with --simplifier blur)"),
    (per_instance, ["--simplifier", "blur", "--jpeg-quality", "20"], "--jpeg-quality (only with"),
    (per_instance, ["--simplifier", "blur", "--lambda-sim", "2"],
     "--lambda-sim (only with --simplifier unet or l2)"),
    (per_instance, ["--simplifier", "jpeg", "--jpeg-quality", "9", "--epochs", "3"], "--epochs"),
    (per_instance, ["--arch", "convnet", "--depth", "16"], "--depth (only with --arch wrn)"),
    (per_instance, ["--quick", "--widen", "2"], "--widen (only with --arch wrn)"),  # quick: convnet
    (per_instance, ["--width", "64"], "--width (only with --arch convnet)"),  # default: wrn
    (per_instance, ["--retrain-epochs", "3"], "--retrain-epochs (only with --retrain, --finetune"),
    (posthoc, ["--classifier", "f.pt", "--train-epochs", "3"],
     "--train-epochs (only when f is trained here, without --classifier)"),
    (posthoc, ["--classifier", "f.pt", "--batch-size", "32"], "--batch-size (only when f is"),
    (posthoc, ["--indices", "1", "2", "--num-images", "8"], "--num-images (only without --indices)"),
])
def test_a_flag_that_does_nothing_in_the_chosen_mode_is_refused(module, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:  # even at its default value
        module.get_args(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("module, argv", [
    (per_instance, ["--simplifier", "blur", "--blur-sigma", "2", "--retrain-epochs", "3"]),
    (per_instance, ["--simplifier", "l2", "--lambda-sim", "1", "--ngf", "8", "--epochs", "2"]),
    (per_instance, ["--arch", "wrn", "--depth", "16", "--widen", "2", "--quick"]),
    (per_instance, ["--quick", "--width", "8", "--retrain", "--retrain-epochs", "3"]),
    (posthoc, ["--train-epochs", "3", "--batch-size", "16", "--depth", "10", "--widen", "1"]),
    (posthoc, ["--classifier", "f.pt", "--num-images", "4", "--select", "correct"]),
])
def test_the_same_flags_are_taken_where_they_act(module, argv):
    args = module.get_args(argv)
    assert all(getattr(args, a.lstrip("-").replace("-", "_")) is not None for a in argv
               if a.startswith("--"))


def test_the_first_lines_of_a_run_are_its_settings_and_its_data(tmp_path, tiny_glow_path, capsys):
    run(per_instance, per_instance_argv(tmp_path / "r", tiny_glow_path))
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith("settings: dataset=shapes  ") and "{" not in first
    assert f"out={tmp_path / 'r'}" in first and "PosixPath" not in first
    names = ", ".join(datasets.load_dataset("shapes").info.class_names)
    assert second == f"data shapes: 5 classes ({names}), 32 training and 16 test images"


def test_a_grid_compares_finished_values_with_the_command(tmp_path, tiny_glow_path):
    def run_grid(argv):  # what `python per_instance.py ...` runs, in this process
        args = per_instance.get_args(argv)
        return nets.run_command(per_instance.main, args, "lambda_sim",
                                per_instance.resolve_config(args).out, per_instance.SUMMARY,
                                per_instance.RESUMABLE)

    grid = per_instance_argv(tmp_path / "g", tiny_glow_path, "--lambda-sim", "0,3")
    run_grid(grid)
    before = (tmp_path / "g" / "lambda_sim=3" / "results.json").read_text()
    # a longer run continues every value; other settings are refused, naming folder and flag
    longer = list(grid)
    longer[longer.index("--epochs") + 1] = "2"
    run_grid(longer)
    for value in ("0", "3"):
        results = json.loads((tmp_path / "g" / f"lambda_sim={value}" / "results.json").read_text())
        assert results["epochs"] == 2
    assert (tmp_path / "g" / "lambda_sim=3" / "results.json").read_text() != before
    refusal = f"{tmp_path / 'g' / 'lambda_sim=0'} holds a run of other settings (--lr "
    with pytest.raises(nets.RunError, match=re.escape(refusal)):
        run_grid(longer + ["--lr", "1e-3"])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv", [
    ["per_instance.py", "--lambda-sim", "nan"], ["per_instance.py", "--lr", "inf"],
    ["condense.py", "--lambda-sim", "inf"], ["posthoc.py", "--lr", "-1"],
    ["posthoc.py", "--lambda-sim", "nan"], ["glow.py", "train", "--epochs", "0"],
    ["glow.py", "train", "--hidden", "-4"], ["glow.py", "train", "--lr", "nan"],
    ["per_instance.py", "--seed", "-1"], ["condense.py", "--seed", str(2 ** 32)],
    ["posthoc.py", "--seed", "1.5"], ["glow.py", "bpd", "--glow", "g.pt", "--dataset", "shapes",
                                      "--seed", "-1"],
])
def test_non_finite_and_nonsense_flags_are_refused_by_the_parser(argv, capsys):
    module = {"per_instance.py": per_instance, "condense.py": condense, "posthoc.py": posthoc,
              "glow.py": glow}[argv[0]]
    with pytest.raises(SystemExit) as exit_info:
        module.get_args(argv[1:])
    assert exit_info.value.code == 2
    assert argv[-2] in capsys.readouterr().err  # the message names the flag


def test_every_seed_numpy_accepts_is_accepted():
    assert per_instance.get_args(["--seed", str(2 ** 32 - 1)]).seed == 2 ** 32 - 1
    nets.seed_everything(2 ** 32 - 1)  # numpy's upper end


def test_non_finite_result_is_an_error(tmp_path, tiny_glow_path, monkeypatch):
    real = posthoc.predictions_and_bpd

    def diverged(*args):
        result = real(*args)
        return dict(result, bpd_simplified=torch.full_like(result["bpd_simplified"], float("nan")))
    monkeypatch.setattr(posthoc, "predictions_and_bpd", diverged)
    with pytest.raises(nets.RunError, match="non-finite .*mean_bpd_simplified"):
        run(posthoc, posthoc_argv(tmp_path / "p", tiny_glow_path))
    assert not (tmp_path / "p" / "results.json").exists()  # a grid would count it finished


def test_diverged_glow_training_is_not_saved(tmp_path):
    out = tmp_path / "g.pt"
    with pytest.raises(nets.RunError, match="diverged"):
        glow.main(glow.get_args(["train", "--dataset", "shapes", "--levels", "1", "--flow-steps", "1",
                                 "--hidden", "4", "--train-size", "64", "--test-size", "16",
                                 "--epochs", "1", "--lr", "1e6", "--warmup-steps", "1",
                                 "--device", "cpu", "--out", str(out)]))
    assert not out.exists()


def test_batch_larger_than_the_training_set_is_one_sentence(tmp_path, tiny_glow_path):
    with pytest.raises(nets.RunError, match="--batch-size 64 is larger than the 32"):
        run(per_instance, per_instance_argv(tmp_path / "r", tiny_glow_path, "--batch-size", "64"))


def default_signals():
    """In the child, before exec: SIGINT and SIGTERM as a fresh terminal gives them. A suite
    started in the background of a script, or under nohup, ignores SIGINT, and a child
    inherits that; the scripts rightly honour it, so the tests must not depend on it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def cli(*argv, timeout=120, **env):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=default_signals,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))


def test_corrupt_and_foreign_checkpoints_are_one_sentence(tmp_path, tiny_glow_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(tiny_glow_path).read_bytes()[:200])
    cases = [["import-y0ast", str(text), "--out", str(tmp_path / "x.pt")],
             ["bpd", "--glow", str(truncated), "--dataset", "shapes", "--out", str(tmp_path / "b")],
             ["train", "--dataset", "shapes", "--resume", "--out", tiny_glow_path]]  # finished
    for argv in cases:
        with pytest.raises(glow.GlowCheckpointError) as error:
            glow.main(glow.get_args(argv + ["--device", "cpu"]))
        message = str(error.value)
        assert "\n" not in message and "Traceback" not in message
    # a mode script's --resume on a truncated checkpoint of its own run, through __main__
    out = tmp_path / "pi"
    run(per_instance, per_instance_argv(out, tiny_glow_path))
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:100])
    proc = cli("per_instance.py", *per_instance_argv(out, tiny_glow_path, "--resume"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read"), proc.stderr
    assert "delete it to restart the run" in lines[0]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_print_one_line_that_says_how_to_resume(tmp_path, tiny_glow_path,
                                                                    signum):
    argv = per_instance_argv(tmp_path / "r", tiny_glow_path)
    argv[argv.index("--epochs") + 1] = "1000"
    proc = subprocess.Popen([sys.executable, "per_instance.py", *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_signals, env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in proc.stdout:  # wait for an event: epoch 1 is checkpointed, 2 is printed
        if line.startswith("epoch 2/1000"):
            break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [err.strip()] and "--resume" in err
    assert str(tmp_path / "r") in err  # where the run can be resumed from
    assert "Traceback" not in err
    assert (tmp_path / "r" / "checkpoint.pt").is_file()  # what --resume continues from


def test_a_run_holds_its_folder_until_it_ends_even_by_kill_9(tmp_path, tiny_glow_path):
    out = tmp_path / "r"
    argv = per_instance_argv(out, tiny_glow_path)
    argv[argv.index("--epochs") + 1] = "1000"
    first = subprocess.Popen([sys.executable, "per_instance.py", *argv], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             preexec_fn=default_signals, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in first.stdout:  # wait for an event: the run has started and checkpointed
            if line.startswith("epoch 2/1000"):
                break
        second = cli("per_instance.py", *argv, "--resume")  # a job array's duplicate index
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: {out} is held by process {first.pid} on "
                                         f"{socket.gethostname()}, which is still running; wait "
                                         "for it to end, or choose another --out.")
        assert "already holds a run" in cli("per_instance.py", *argv).stderr
        assert first.poll() is None and first.stdout.readline().startswith("epoch ")  # unaffected
    finally:
        first.kill()  # SIGKILL: no handler runs, the OS releases the lock
        first.wait()
    free = cli("-c", f"import nets; nets.hold({str(out / '.lock')!r}, 'x'); print('held')")
    assert free.stdout.strip() == "held", free.stderr


def test_a_stdout_that_cannot_encode_greek_letters_does_not_crash_a_run(tmp_path,
                                                                        tiny_glow_path):
    # condense prints "λ = 1" and "±" in its progress lines; a Windows redirect is cp1252
    # (no λ), LANG=C is ASCII
    proc = cli("condense.py", *condense_argv(tmp_path / "c", tiny_glow_path),
               PYTHONIOENCODING="ascii")
    assert proc.returncode == 0, proc.stderr
    assert "λ = 1" not in proc.stdout and "? = 1" in proc.stdout
    assert (tmp_path / "c" / "results.json").is_file()


def red_shapes_folder(root):
    """Two classes of pure red shapes on black: green and blue never vary (std 0)."""
    from PIL import Image, ImageDraw
    for split, n in (("train", 16), ("test", 8)):
        for name in ("disk", "square"):
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                image = Image.new("RGB", (32, 32))
                box = (4 + k % 5, 6 + k % 4, 22 + k % 7, 24 + k % 6)
                draw = ImageDraw.Draw(image)
                (draw.ellipse if name == "disk" else draw.rectangle)(box, fill=(255, 0, 0))
                image.save(root / split / name / f"{k}.png")
    return str(root)


def test_a_channel_that_never_varies_trains(tmp_path, tiny_glow_path):
    folder = red_shapes_folder(tmp_path / "red")
    import datasets
    assert datasets.load_dataset(folder).info.std[1:] == (datasets.STD_FLOOR,) * 2
    results = run(per_instance, per_instance_argv(tmp_path / "pi", tiny_glow_path, "--dataset",
                                                  folder))
    assert results["skipped_steps"] == 0
    results = run(posthoc, posthoc_argv(tmp_path / "ph", tiny_glow_path, "--dataset", folder,
                                        "--train-size", "32", "--test-size", "16"))
    assert math.isfinite(results["classifier_test_acc"])


def nan_images(monkeypatch):
    import datasets
    real = datasets.Batches.get
    monkeypatch.setattr(datasets.Batches, "get",
                        lambda self, *a, **k: (lambda x, y: (x * math.nan, y))(*real(self, *a, **k)))


def test_a_run_that_skipped_every_step_fails_without_results(tmp_path, tiny_glow_path,
                                                             monkeypatch):
    nan_images(monkeypatch)  # every loss is NaN, so every step is skipped
    out = tmp_path / "pi"
    with pytest.raises(nets.RunError, match=r"epoch 1/1 skipped 4 of its 4 steps"):
        run(per_instance, per_instance_argv(out, tiny_glow_path))
    assert not (out / "results.json").exists() and not (out / "checkpoint.pt").exists()
    with pytest.raises(nets.RunError, match="classifier epoch 1: the training loss is not finite"):
        run(posthoc, posthoc_argv(tmp_path / "ph", tiny_glow_path))
    assert not (tmp_path / "ph" / "results.json").exists()


def test_a_condensation_whose_bpd_term_was_always_left_out_fails(tmp_path, tiny_glow_path,
                                                                 monkeypatch):
    real = glow.bits_per_dim
    monkeypatch.setattr(glow, "bits_per_dim", lambda *a, **k: real(*a, **k) * math.nan)
    out = tmp_path / "c"
    argv = condense_argv(out, tiny_glow_path)
    argv[argv.index("--iterations") + 1] = "10"
    with pytest.raises(nets.RunError, match=r"iterations 1-10 skipped 10 of its 10 bpd terms"):
        run(condense, argv)
    assert not (out / "results.json").exists()


def test_summarize_of_a_folder_without_finished_runs_says_so(tmp_path):
    (tmp_path / "grid" / "lambda_sim=1").mkdir(parents=True)
    (tmp_path / "grid" / "lambda_sim=1" / "args.json").write_text("{}")  # interrupted
    (tmp_path / "grid" / "quick-glow").mkdir()
    for folder, words in ((tmp_path / "grid", "holds no finished run (a sub-folder with "
                                              "results.json); unfinished: lambda_sim=1."),
                          (tmp_path / "none", "is not a folder")):
        proc = cli("per_instance.py", "--summarize", str(folder))
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert not (folder / "tradeoff.csv").exists()


def test_ipc_above_the_smallest_class_is_refused_before_any_glow_is_trained(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(glow, "train_glow", lambda *a, **k: pytest.fail("Glow was trained"))
    out = tmp_path / "c"
    with pytest.raises(nets.RunError, match=r"--ipc 100000 is more than the \d+ training "
                                            "images of class"):
        run(condense, ["--dataset", "shapes", "--quick", "--ipc", "100000", "--device", "cpu",
                       "--out", str(out)])
    assert not out.exists() and not (tmp_path / "quick-glow").exists()


def test_one_class_and_non_square_folders_warn(tmp_path):
    import datasets
    from PIL import Image
    for split in ("train", "test"):
        (tmp_path / split / "only").mkdir(parents=True)
        for k in range(2):  # 40×24 grayscale, like a small radiograph
            Image.new("L", (40, 24), color=30 * k).save(tmp_path / split / "only" / f"{k}.png")
    with pytest.warns(UserWarning) as record:
        data = datasets.load_dataset(str(tmp_path), train=True)
    messages = " ".join(str(w.message) for w in record)
    assert "1 class sub-folder" in messages and "not square" in messages
    assert data[0][0].shape == (3, 32, 32)  # resized, grayscale repeated


def test_glow_train_resume_refuses_other_settings_and_warns_about_long_warmup(tmp_path, capsys):
    out = tmp_path / "g.pt"
    tiny = ["train", "--dataset", "shapes", "--levels", "1", "--flow-steps", "1", "--hidden", "4",
            "--train-size", "64", "--test-size", "16", "--batch-size", "16", "--device", "cpu",
            "--out", str(out)]
    # an unfinished run: its checkpoint keeps the optimizer and the flags it was started with
    started = vars(glow.get_args(tiny + ["--epochs", "3"]))
    glow.save_glow(glow.Glow(levels=1, steps=1, hidden=4), out, settings=started, optimizer={},
                   epoch=1, step=4)
    with pytest.raises(nets.RunError, match="other settings.*--dataset 'shapes'"):
        glow.main(glow.get_args(tiny[:2] + ["mnist"] + tiny[3:] + ["--epochs", "3", "--resume"]))
    with pytest.raises(nets.RunError, match="other settings.*--hidden 4"):
        glow.main(glow.get_args(tiny + ["--epochs", "3", "--hidden", "8", "--resume"]))
    # 4 steps per epoch, 1 epoch: the default warm-up is a tenth of the run, at least 1 step
    glow.main(glow.get_args(tiny[:-1] + [str(tmp_path / "a.pt"), "--epochs", "1"]))
    assert "linear warm-up over 1 of 4 steps" in capsys.readouterr().out
    glow.main(glow.get_args(tiny[:-1] + [str(tmp_path / "b.pt"), "--epochs", "1",
                                         "--warmup-steps", "100"]))
    assert "warm-up (100 steps) is longer than the run (4 steps)" in capsys.readouterr().out


def test_posthoc_resume_reuses_its_classifier_and_rewrites_metrics(tmp_path, tiny_glow_path):
    out = tmp_path / "p"
    first = run(posthoc, posthoc_argv(out, tiny_glow_path))
    classifier = (out / "classifier.pt").read_bytes()
    again = run(posthoc, posthoc_argv(out, tiny_glow_path, "--resume"))
    assert (out / "classifier.pt").read_bytes() == classifier  # loaded, not trained again
    assert again["classifier_test_acc"] == first["classifier_test_acc"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["classifier", "simplify", "simplify"]  # no duplicates


@pytest.mark.parametrize("stop_at", [1, 3])  # before any checkpoint of z_sim, or after one
def test_posthoc_interrupted_in_either_phase_resumes_to_the_uninterrupted_numbers(
        tmp_path, tiny_glow_path, monkeypatch, stop_at):
    argv = ["--steps", "4", "--log-every", "2"]
    straight = run(posthoc, posthoc_argv(tmp_path / "a", tiny_glow_path, *argv))
    real_step, calls = posthoc.simplify_step, []

    def stop(*a, **k):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(posthoc, "simplify_step", stop)
    with pytest.raises(KeyboardInterrupt):
        run(posthoc, posthoc_argv(tmp_path / "b", tiny_glow_path, *argv))
    monkeypatch.setattr(posthoc, "simplify_step", real_step)
    resumed = run(posthoc, posthoc_argv(tmp_path / "b", tiny_glow_path, *argv, "--resume"))
    for key in ("mean_bpd_simplified", "mean_bpd_start", "images"):
        assert resumed[key] == straight[key], key
    a, b = (torch.load(tmp_path / r / "simplified.pt", weights_only=True) for r in "ab")
    assert torch.equal(a["images"], b["images"])
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r.get("step")) for r in rows] == [
        ("classifier", None), ("simplify", 2), ("simplify", 4)]
    # more --steps continue the finished run from its last step; fewer are refused
    longer = run(posthoc, posthoc_argv(tmp_path / "a", tiny_glow_path, "--steps", "6",
                                       "--log-every", "2", "--resume"))
    assert longer["steps"] == 6 and longer["mean_bpd_simplified"] != straight["mean_bpd_simplified"]
    with pytest.raises(nets.RunError, match="finished run of steps 6, more than 4"):
        run(posthoc, posthoc_argv(tmp_path / "a", tiny_glow_path, *argv, "--resume"))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in rows] == [None, 2, 4, 6]


# ----------------------------------------------------------------------------- grids (Fig. 5)
def test_grid_flags_are_settled_by_the_parser(capsys):
    args = per_instance.get_args(["--lambda-sim", "0,2.5"])
    assert args.lambda_sim == (0.0, 2.5) and args.grid_index is None
    assert per_instance.get_args(["--lambda-sim", "2"]).lambda_sim == 2.0  # one value: a plain run
    assert per_instance.get_args(["--simplifier", "jpeg", "--jpeg-quality", "10,30"]).jpeg_quality \
        == (10.0, 30.0)
    assert "lam0_2.5" in str(per_instance.resolve_config(args).out)
    for bad, words in [(["--simplifier", "blur", "--lambda-sim", "0,1"], "--blur-sigma"),
                       (["--grid-index", "0"], "needs a grid"),
                       (["--simplifier", "jpeg", "--jpeg-quality", "20.5"], "integer"),
                       (["--lambda-sim", "0,1,0"], "repeats"),
                       (["--summarize", "a", "b"], "--out")]:
        with pytest.raises(SystemExit) as exit_info:
            per_instance.get_args(bad)
        assert exit_info.value.code == 2 and words in capsys.readouterr().err, bad


def test_grid_runs_each_value_skips_finished_ones_and_summarizes(tmp_path, tiny_glow_path,
                                                                  monkeypatch):
    """--lambda-sim 0,3: each value into its own sub-folder, tradeoff.csv with one row per
    run holding that run's results; a rerun runs nothing; --grid-index runs one value."""
    calls = []
    main = per_instance.main
    monkeypatch.setattr(per_instance, "main", lambda args: calls.append(args.lambda_sim) or main(args))

    def grid(out, *extra):
        args = per_instance.get_args(per_instance_argv(out, tiny_glow_path, "--lambda-sim", "0,3",
                                                       *extra))
        return nets.run_command(per_instance.main, args, "lambda_sim",
                                per_instance.resolve_config(args).out, per_instance.SUMMARY)

    grid(tmp_path / "g")
    assert calls == [0.0, 3.0]
    rows = list(csv.DictReader((tmp_path / "g" / "tradeoff.csv").open()))
    assert [r["run"] for r in rows] == ["g/lambda_sim=0", "g/lambda_sim=3"]
    for row in rows:
        results = json.loads((tmp_path / "g" / row["run"].split("/")[1] / "results.json").read_text())
        assert float(row["lambda_sim"]) == results["lambda_sim"]
        for key in ("test_acc_simplified", "test_bpd_simplified", "test_bpd", "png_bytes"):
            assert float(row[key]) == pytest.approx(results[key], rel=1e-12), key
    assert (tmp_path / "g" / "tradeoff.png").stat().st_size > 1000
    before = snapshot(tmp_path / "g" / "lambda_sim=0")
    grid(tmp_path / "g")  # the same command again: both values are finished
    assert calls == [0.0, 3.0] and snapshot(tmp_path / "g" / "lambda_sim=0") == before
    grid(tmp_path / "h", "--grid-index", "1")  # one job of an array
    assert calls[2:] == [3.0] and sorted(p.name for p in (tmp_path / "h").iterdir()) == [
        "lambda_sim=3", "tradeoff.csv", "tradeoff.png"]
    with pytest.raises(nets.RunError, match="0 to 1"):
        grid(tmp_path / "h", "--grid-index", "2")
    proc = cli("per_instance.py", "--summarize", str(tmp_path / "g"), str(tmp_path / "h"),
               "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "s" / "tradeoff.csv").open()))
    assert [r["run"] for r in rows] == ["g/lambda_sim=0", "g/lambda_sim=3", "h/lambda_sim=3"]


def test_quick_runs_use_one_cpu_thread_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        nets.quick_threads(False, torch.device("cpu"))  # full presets: torch's default
        nets.quick_threads(True, torch.device("meta"))  # not a CPU run
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        nets.quick_threads(True, torch.device("cpu"))  # the user's choice wins
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        nets.quick_threads(True, torch.device("cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_condense_grid_summary_has_both_series(tmp_path, tiny_glow_path):
    """condense.py --lambda-sim 0,1: tradeoff.csv holds each run's results; the chart's two
    series (condensed, random real) are drawn (their colours appear in tradeoff.png)."""
    argv = condense_argv(tmp_path / "g", tiny_glow_path)
    argv[argv.index("--lambda-sim") + 1] = "0,1"
    args = condense.get_args(argv)
    assert args.lambda_sim == (0.0, 1.0) and "lam0_1" in str(condense.resolve_config(
        condense.get_args(argv[:-2])).out)
    nets.run_command(condense.main, args, "lambda_sim", args.out, condense.SUMMARY)
    rows = list(csv.DictReader((tmp_path / "g" / "tradeoff.csv").open()))
    assert [float(r["lambda_sim"]) for r in rows] == [0.0, 1.0]
    for row in rows:
        results = json.loads((tmp_path / row["run"] / "results.json").read_text())
        for key in ("test_acc_mean", "random_real_acc_mean", "bpd_synthetic", "bpd_real"):
            assert float(row[key]) == pytest.approx(results[key], rel=1e-12), key
    from PIL import Image
    pixels = np.asarray(Image.open(tmp_path / "g" / "tradeoff.png").convert("RGB"))
    colours = set(map(tuple, pixels.reshape(-1, 3).tolist()))
    assert set(map(tuple, nets.COLOURS[:2])) <= colours


def test_compile_flag_compiles_the_scoring_glow_of_every_mode(tmp_path, tiny_glow_path):
    """--compile, a flag of every mode script, hands the mode a torch.compile'd frozen Glow
    (compiled lazily, so nothing is compiled here); without it the eager frozen Glow."""
    train, test = (datasets.subset(datasets.load_dataset("shapes", train=t), 8, 0)
                   for t in (True, False))
    for module, argv, *_ in SCRIPTS.values():
        for flag in ([], ["--compile"]):
            cfg = module.resolve_config(module.get_args(argv(tmp_path / "o", tiny_glow_path,
                                                             *flag)))
            model, _ = glow.glow_for_run(cfg, train, test, "cpu")
            assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule) == bool(flag)
            assert model.folded


def test_checking_the_glow_against_the_data_draws_nothing(tiny_glow_path):
    """get_glow reads the data's image shape from an item; a composite's training item
    draws its distractor from the global stream, which must not move (a run's numbers
    would then depend on whether the check ran)."""
    class Drawing(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3, 32, 32), 0

    torch.manual_seed(3)
    before = torch.get_rng_state()
    glow.get_glow(tiny_glow_path, False, Drawing(), None, "cpu")
    assert torch.equal(torch.get_rng_state(), before)


def test_compile_flag_runs_the_first_order_network_steps_compiled(tmp_path, tiny_glow_path,
                                                                  monkeypatch):
    """--compile in every mode: the frozen Glow and the networks each mode trains by plain
    first-order steps (the per-instance classifier in joint training and --retrain, the
    condensation and evaluation ConvNets, post hoc's f) are handed to torch.compile, and
    the steps call what it returned. A stand-in for torch.compile counts the calls."""
    class Counted(torch.nn.Module):  # what torch.compile returns, counting its calls
        def __init__(self, model):
            super().__init__()
            self.model, self.calls = model, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.model(*args, **kwargs)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.model, name)

    made = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: made.append(Counted(model)) or
                        made[-1])
    expected = {"per_instance": {"Glow", "ConvNet"}, "condense": {"Glow", "ConvNet"},
                "posthoc": {"Glow", "NFWideResNet"}}
    for name, (module, argv, *_) in SCRIPTS.items():
        made.clear()
        extra = ["--retrain", "--retrain-epochs", "1"] if name == "per_instance" else []
        run(module, argv(tmp_path / name, tiny_glow_path, "--compile", *extra))
        made[:] = [c for c in made if isinstance(c.model, torch.nn.Module)]  # no probe
        assert {type(c.model).__name__ for c in made} == expected[name], name
        assert all(c.calls for c in made), name  # every compiled network was used
        if name == "per_instance":  # the joint classifier and the retrained one
            assert sum(type(c.model).__name__ == "ConvNet" for c in made) == 2


def test_compile_without_a_working_compiler_is_one_sentence_before_anything_runs(
        tmp_path, tiny_glow_path, monkeypatch):
    """--compile on a machine where torch.compile cannot build (no C++ compiler in a slim
    image, no Triton): every mode script and `glow.py train`/`bpd` say so in one sentence
    before a run starts (no args.json, no Glow pretrained), instead of a traceback from
    inside the first step."""
    def broken(fn, **kw):
        def call(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in "
                               "torch._inductor.config.cpp.cxx: (None, 'g++')\nsecond line")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    said = (r"--compile: torch.compile does not work here on cpu \(RuntimeError: "
            r"InvalidCxxCompiler: No working C\+\+ compiler.*\); install .* or drop --compile")
    for name, (module, argv, *_) in SCRIPTS.items():
        with pytest.raises(nets.RunError, match=said):
            run(module, argv(tmp_path / name, tiny_glow_path, "--compile"))
        assert not (tmp_path / name / "args.json").exists(), name
    for argv in (["train", "--quick", "--out", str(tmp_path / "g.pt"), "--device", "cpu"],
                 ["bpd", "--glow", tiny_glow_path, "--dataset", "shapes", "--out",
                  str(tmp_path / "bpd"), "--device", "cpu"]):
        with pytest.raises(nets.RunError, match=said):
            glow.main(glow.get_args(argv + ["--compile"]))
    assert not (tmp_path / "g.pt").exists() and not (tmp_path / "bpd").exists()
    # where torch.compile works, the probe passes and nothing is said
    monkeypatch.undo()
    nets.check_compile("cpu")
