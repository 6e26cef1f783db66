"""predict.py: a problem's experts (one given by file) and a rule classify a folder of PNG/JPEG images or a
tensor file, one line per image; the same answers as the evaluation on the same images, also given as raw 28x28
MNIST digits; refusals in one line."""
from __future__ import annotations

import csv

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png, write_file

import merge
import predict
import problems
import train_pan
import train_source_networks
from common import CheckpointError, UserError
from config import ConfigError, MergeConfig, PanConfig, PredictConfig, TaskSpec, TrainConfig, parse_args
from data import InputFormat, load_task, prepare_input, to_unit
from problems import build_problem
from test_expert_files import (DIGITS, GATE, MNIST, SEED, args, env, fit_tiny,  # noqa: F401  (env: a fixture)
                               write_problem)

GATE_RULE = "gate_hard(gate=universal,regime=real)"


def predict_cfg(env, yaml_file, *extra: str) -> PredictConfig:
    return parse_args(PredictConfig, [str(yaml_file), f"seed={SEED}", f"ckpt_dir={env['ckpt']}", "device=cpu",
                                      "expert.epochs=1", "expert.batch_size=16", *GATE, *extra])


@pytest.fixture(scope="module")
def mixed(env, tmp_path_factory):
    """The problem file (TorchScript TinyMLP beside this project's LeNet5) and its universal gate."""
    folder = tmp_path_factory.mktemp("predict")
    yaml_file = write_problem(folder / "mixed.yaml", env["entries"]["torchscript"])
    train_pan.main(parse_args(PanConfig, [str(yaml_file), *args(env, folder), "gate_types=[universal]",
                                          "regimes=[real]"]))
    cfg = parse_args(MergeConfig, [str(yaml_file), *args(env, folder)])
    return yaml_file, build_problem("mixed", cfg.problems["mixed"], cfg.tasks, cfg.data_dir)


@pytest.mark.parametrize("rule", ["naive", GATE_RULE])
def test_predict_gives_the_evaluations_answers(env, mixed, tmp_path, rule):
    yaml_file, problem = mixed
    images = torch.cat([d.images for d in problem.domains])
    predictions = predict.predict(predict_cfg(env, yaml_file, f"rule={rule}"), images)
    assert len(predictions) == len(images)
    accuracy = sum(p.class_id == int(y) for p, y in zip(predictions, problem.labels)) / len(images)
    strategy = "[naive]" if rule == "naive" else "[{name: gate_hard, gate: universal, regime: real}]"
    summary = merge.main(parse_args(MergeConfig, [str(yaml_file), *args(env, tmp_path), f"strategies={strategy}"]))
    assert accuracy == pytest.approx(summary["acc"][rule]["mean"])
    assert {p.expert for p in predictions} <= {"first5_mnist", "last5_mnist"}
    assert all(p.class_name == problem.class_names[p.class_id] and 0 < p.confidence <= 1 for p in predictions)


def test_predict_classifies_a_folder_of_images(env, mixed, tmp_path, capsys):
    yaml_file, problem = mixed
    folder = tmp_path / "images"
    folder.mkdir()
    grey = problem.domains[1].images[:3]  # three digits 5-9, grey 32x32
    for i, image in enumerate(grey):
        write_file(str(folder / f"digit{i}.png"), encode_png(image))
    big = torch.nn.functional.interpolate(grey[:1].float(), size=64).to(torch.uint8).expand(1, 3, 64, 64)
    write_file(str(folder / "rgb.jpg"), encode_jpeg(big[0].contiguous(), quality=95))  # colour, larger
    (folder / "notes.txt").write_text("not an image")
    output = tmp_path / "predictions.csv"
    summary = predict.main(predict_cfg(env, yaml_file, f"inputs={folder}", f"output={output}"))
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line]
    assert [line[0] for line in lines] == [str(folder / n) for n in ("digit0.png", "digit1.png", "digit2.png",
                                                                       "rgb.jpg")]
    assert all(line[1] in problem.class_names and line[2] in problem.names for line in lines)
    assert summary["images"] == 4 and sum(summary["routing_counts"].values()) == 4
    with open(output, newline="") as f:
        assert [row["name"] for row in csv.DictReader(f)] == [line[0] for line in lines]
    tensor_file = tmp_path / "batch.pt"
    torch.save(grey, tensor_file)
    again = predict.main(predict_cfg(env, yaml_file, f"inputs={tensor_file}"))
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line]
    assert [r[0] for r in rows] == ["batch.pt[0]", "batch.pt[1]", "batch.pt[2]"] and again["images"] == 3
    assert [r[1:3] for r in rows] == [line[1:3] for line in lines[:3]]  # PNG round trip is lossless


def test_predict_refuses_in_one_line_before_reading_images(env, mixed, tmp_path):
    yaml_file, _ = mixed
    cases = [("rule=oracle", ConfigError, "reads the true domain"),
             ("rule={name: tta_mean, setting: flips}", ConfigError, "runs augmented passes"),
             ("rule=self_train(gate=logits)", ConfigError, "fits its router on the selection half"),
             ("rule={name: gate_hard, gate: feature, regime: real}", ConfigError, "no feature_layer"),
             ("rule={name: gate_hard, gate: logits, regime: real}", CheckpointError, "python train_pan.py"),
             (f"inputs={tmp_path / 'nowhere'}", UserError, "does not exist")]
    for arg, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            predict.main(predict_cfg(env, yaml_file, arg, f"inputs={tmp_path}"
                                     if not arg.startswith("inputs") else arg))
        assert "\n" not in str(caught.value) or error is CheckpointError
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="cannot decode"):
        predict.main(predict_cfg(env, yaml_file, f"inputs={broken}"))


# ---------------------------------------------------------------- raw MNIST digits, as the experts learnt them

REAL_DIGITS = 60  # per expert: the first 60 test digits 0-4 and the first 60 digits 5-9 of the real MNIST
REAL_EXPERT = ["expert.epochs=1", "expert.batch_size=16", "expert.train_limit=2000"]


@pytest.fixture(scope="module")
def real_mnist(data_dir, tmp_path_factory):
    """disjoint_mnist on the real digits: this project's LeNet5 on 0-4 (trained on the padded 32x32 images) and,
    by file with ``crop: 2``, a TinyMLP trained on the 28x28 originals of 5-9 (a state dict, so its layers can be
    watched). Returns the problem file and the settings every stage shares."""
    base = tmp_path_factory.mktemp("real")
    settings = [f"ckpt_dir={base / 'ckpt'}", "device=cpu", *REAL_EXPERT]
    train_source_networks.main(parse_args(TrainConfig, ["dataset=first5_mnist", f"seeds=[{SEED}]", *settings,
                                                        f"data_dir={data_dir}", f"results_dir={base / 'results'}"]))
    train = load_task(TaskSpec("mnist", [5, 6, 7, 8, 9]), "train", data_dir, limit=2000)
    tiny = fit_tiny(prepare_input(to_unit(train.images[..., 2:30, 2:30]), InputFormat.of("mnist")), train.labels)
    torch.save(tiny.state_dict(), base / "tiny_state.pt")
    entry = {**MNIST, "crop": 2, "classes": DIGITS, "path": str(base / "tiny_state.pt"),
             "model": "external_models:TinyMLP", "model_kwargs": {"hidden": 32}}
    return write_problem(base / "real.yaml", entry), settings


def test_raw_28x28_digits_reach_each_expert_as_its_training_images_did(real_mnist, data_dir, tmp_path,
                                                                        monkeypatch):
    """28x28 PNGs are padded to the problem's 32x32 as MNIST's test set is (not stretched): predict scores them
    as merge.py scores the same digits, and the file expert's crop: 2 gives its network the original pixels."""
    yaml_file, settings = real_mnist
    merge_cfg = parse_args(MergeConfig, [str(yaml_file), *settings, f"seeds=[{SEED}]", f"data_dir={data_dir}",
                                         f"results_dir={tmp_path}", f"test_limit={REAL_DIGITS}", "strategies=[naive]"])
    problem = build_problem("mixed", merge_cfg.problems["mixed"], merge_cfg.tasks, merge_cfg.data_dir, REAL_DIGITS)
    padded = torch.cat([d.images for d in problem.domains])
    originals = padded[..., 2:30, 2:30]
    assert originals.sum() == padded.sum()  # the Pad(2) border is empty: the PNGs hold every pixel
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(originals):
        write_file(str(folder / f"{i:04d}.png"), encode_png(image.contiguous()))
    seen = []  # what the file expert's own network is given

    def watched(*a, **k):
        expert = load_file_expert(*a, **k)
        expert.net.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        return expert

    load_file_expert = problems.load_file_expert
    monkeypatch.setattr(problems, "load_file_expert", watched)
    names, images = predict.read_inputs(str(folder))
    cfg = parse_args(PredictConfig, [str(yaml_file), *settings, f"seed={SEED}", "rule=naive"])
    predictions = predict.predict(cfg, images, names)
    torch.testing.assert_close(torch.cat(seen), prepare_input(to_unit(originals), InputFormat.of("mnist")),
                               rtol=0, atol=0)
    accuracy = sum(p.class_id == int(y) for p, y in zip(predictions, problem.labels)) / len(predictions)
    summary = merge.main(merge_cfg)
    assert accuracy == pytest.approx(summary["acc"]["naive"]["mean"])
    assert accuracy > 0.7  # experts that learnt the real digits: the equality above means something
