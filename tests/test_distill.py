"""Label-free distillation (trtkit.distill) after pruning and during QAT, and the recipe's [prune] and
[distill] stages with the compression table in the report. The digits CNN is trained for real (toy data)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from trtkit import distill as kd  # noqa: E402
from trtkit import pruning, qat  # noqa: E402
from trtkit.errors import OptionError, UnknownNameError  # noqa: E402


def agreement(model, teacher, x):
    with torch.no_grad():
        return float((model(x).argmax(1) == teacher(x).argmax(1)).float().mean())


def test_distillation_recovers_a_pruned_network_without_labels(digits_model, digits_data):
    x_train, _, x_test, _ = digits_data
    train, test = x_train[:512], torch.from_numpy(x_test)
    teacher = kd.teacher_copy(digits_model)
    pruned, report = pruning.prune(digits_model, torch.from_numpy(x_test[:1]), ratio=0.6)
    assert report["macs_fraction"] < 0.3
    before = agreement(pruned, teacher, test)
    history = kd.distill(pruned, teacher, train, epochs=20, lr=2e-3, batch_size=64, device="cpu", progress=False)
    after = agreement(pruned, teacher, test)
    assert history[-1] < history[0]
    assert before < 0.3 and after >= 0.85, (before, after)  # measured: 0.10 -> 0.90


def test_feature_distillation_projects_pruned_channels(digits_model, digits_data):
    x_train, _, _, _ = digits_data
    teacher = kd.teacher_copy(digits_model)
    pruned, _ = pruning.prune(digits_model, torch.from_numpy(x_train[:1]), ratio=0.5)
    assert pruned.head_conv[0].out_channels < teacher.head_conv[0].out_channels
    history = kd.distill(pruned, teacher, x_train[:128], epochs=2, kl=1.0, features=["head_conv"], device="cpu",
                         progress=False, augment=True)
    assert len(history) == 2 and np.isfinite(history).all()
    with pytest.raises(UnknownNameError, match="unknown student layer 'head_conf'"):
        kd.distill(pruned, teacher, x_train[:32], features=["head_conf"], device="cpu", progress=False)
    with pytest.raises(OptionError, match="epochs"):
        kd.distill(pruned, teacher, x_train[:32], epochs=0, device="cpu", progress=False)


def test_distillation_during_qat_beats_plain_qat_on_the_same_data(digits_model, digits_data):
    """Quantization-aware distillation vs QAT on hard labels (the FP32 network's own top-1: label-free
    both), same data, epochs and learning rate; the fake-quantized copy still exports to Q/DQ ONNX."""
    x_train, _, x_test, _ = digits_data
    train, test = x_train[:256], torch.from_numpy(x_test)
    teacher = kd.teacher_copy(digits_model)
    qmodel = qat.quantize_model(digits_model, device="cpu")
    qat.calibrate(qmodel, [train[i:i + 64] for i in range(0, 256, 64)], method="minmax")
    import copy

    plain = copy.deepcopy(qmodel)
    with torch.no_grad():
        pseudo = teacher(torch.from_numpy(train)).argmax(1)
    qat.finetune(plain, train, pseudo, epochs=3, lr=1e-3, batch_size=32)
    kd.distill(qmodel, teacher, train, epochs=3, lr=1e-3, batch_size=32, device="cpu", progress=False,
               schedule="constant")
    with torch.no_grad():
        target = torch.softmax(teacher(test), 1)
        kl_plain = torch.nn.functional.kl_div(torch.log_softmax(plain(test), 1), target, reduction="batchmean")
        kl_qad = torch.nn.functional.kl_div(torch.log_softmax(qmodel(test), 1), target, reduction="batchmean")
    assert float(kl_qad) < float(kl_plain)  # closer to the FP32 network on held-out digits
    assert agreement(qmodel, teacher, test) >= agreement(plain, teacher, test) - 0.01


def test_recipe_prune_and_distill_stages_and_the_compression_table(tmp_path):
    from conftest import run_cli

    from trtkit.examples.digits import prepare_example

    recipe = prepare_example(tmp_path)
    text = recipe.read_text().replace('''[[builders]]
name = "tensorrt-rtx"              # ahead-of-time engine build on the CPU, when tensorrt-rtx is installed
optional = true
precisions = ["int8"]
''', "").replace('''[[evaluators]]
name = "speed"
options = { duration_s = 1.0 }
''', "")
    text = text.replace("[[passes]]\nname = \"simplify\"", '''[prune]
criterion = "l2"
ratio = 0.5

[distill]
epochs = 3
lr = 0.002
device = "cpu"

[[passes]]
name = "simplify"''', 1)
    recipe.write_text(text.replace('max_accuracy_drop = 0.01', 'max_accuracy_drop = 0.2'))
    out = tmp_path / "run"
    result = run_cli("run", str(recipe), "-o", str(out))
    assert result.returncode in (0, 1), result.stderr
    html = (out / "report.html").read_text()
    assert "Compression: FLOPs, parameters, latency and agreement" in html
    import onnx

    def weights(path):
        return sum(int(np.prod(t.dims)) for t in onnx.load(path).graph.initializer)

    export_dirs = [p for p in (out / ".trtkit-cache").rglob("dense.onnx")] if (out / ".trtkit-cache").exists() \
        else list(out.rglob("dense.onnx"))
    assert export_dirs, "the export step wrote no dense.onnx"
    folder = export_dirs[0].parent
    assert weights(folder / "model.onnx") < 0.5 * weights(folder / "dense.onnx")
    report = json.loads((folder / "compression.json").read_text())
    assert report["prune"]["criterion"] == "l2" and len(report["distill"]["loss"]) == 3


def test_recipe_bad_prune_ratio_is_one_line_exit_2(tmp_path):
    from conftest import run_cli

    from trtkit.examples.digits import prepare_example

    recipe = prepare_example(tmp_path)
    recipe.write_text(recipe.read_text().replace('[[passes]]\nname = "simplify"',
                                                 '[prune]\nratio = 1.5\n\n[[passes]]\nname = "simplify"', 1))
    out = tmp_path / "run"
    result = run_cli("run", str(recipe), "-o", str(out))
    assert result.returncode == 2, result.stderr
    assert "ratio must be in (0, 1), got 1.5" in result.stderr
    assert not (out / "report.html").exists() and not list(out.rglob("*.onnx"))
