"""`igdmfast export` and `export_student` (issue #29, items 3-4): a tiny real run exported, loaded back by igdmfast and
by timm with the same logits, its ONNX file against PyTorch on real digits, the card and `robustbench.json` against the
run's `metrics.json`, and the bad inputs (each one line on stderr and exit status 2)."""
import contextlib, io, json, re, shutil
from pathlib import Path
import pytest
import torch

from igdmfast.cli import main
from igdmfast.export import (ExportError, export_student, load_student, need_onnx, robustness_rows, robustbench_info, run_state,
                             _valid_images)
from igdmfast.models import load_teacher, save_weights
from igdmfast.stats import binomial_ci

# One epoch on 256 digits, 50 test images, 2 PGD steps: a real run folder in a few seconds (CI time is tight).
TINY = ('--epochs', '1', '--n-train', '256', '--n-valid', '50', '--bs', '64', '--steps', '2', '--student', 'small_cnn',
        '--method', 'ard', '--device', 'cpu')


def cli(*args)->tuple:
    "`igdmfast ARGS` in this process: (exit status, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def refused(args, pattern):
    "The command exits 2 with one line `igdmfast: error: ...` matching `pattern`."
    rc, _, err = cli(*args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith('igdmfast: error: '), (rc, err)
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope='module')
def run_aa(tmp_path_factory):
    "A finished run whose AutoAttack ran on a seeded subset (2 of the 50 test images)."
    out = tmp_path_factory.mktemp('aa')/'run'
    rc, _, err = cli('train', *TINY, '--n-aa', 2, '--out', out)
    assert rc == 0, err[-3000:]
    return out


@pytest.fixture(scope='module')
def exported(run_aa, tmp_path_factory):
    "`igdmfast export RUN --out DIR` of `run_aa`: (folder, stdout)."
    out = tmp_path_factory.mktemp('export')/'student'
    rc, stdout, err = cli('export', run_aa, '--out', out)
    assert rc == 0, err[-3000:]
    return out, stdout


@pytest.fixture(scope='module')
def digits(run_aa):
    "The run's 50 validation digits and the logits of its student.pt on them."
    x = _valid_images(run_state(run_aa)['cfg'])[0]
    with torch.no_grad(): return x, load_teacher(run_aa/'student.pt')(x)


def copy_run(run, dst):
    "A copy of the run folder (without its lock file) to damage."
    return Path(shutil.copytree(run, dst, ignore=shutil.ignore_patterns('.igdmfast.lock')))


def test_export_writes_every_file(exported):
    out, stdout = exported
    for f in ('config.json', 'model.safetensors', 'README.md', 'robustbench.json', 'model.onnx'):
        assert (out/f).is_file() and (out/f).stat().st_size > 0, f
    assert re.search(r'ONNX check on 50 validation images: max \|Δ logit\| \S+ \(tolerance 0\.0001\), the same class on 50 of 50', stdout)
    assert json.loads((out/'config.json').read_text())['command'] == 'export'


def test_load_student_and_timm_give_the_same_logits(exported, digits):
    "load_student, timm's local-dir and timm's pretrained_cfg_overlay(file=...) all rebuild the run's student exactly."
    import timm
    out, (x, ref) = exported[0], digits
    cfg = json.loads((out/'config.json').read_text())
    assert cfg['architecture'] == 'small_cnn' and cfg['num_classes'] == 10 and cfg['pretrained_cfg']['input_size'] == [1, 8, 8]
    assert cfg['igdmfast']['normalization_inside'] is None and cfg['pretrained_cfg']['mean'] == [0.] and cfg['pretrained_cfg']['std'] == [1.]
    models = [load_student(out), timm.create_model(f'local-dir:{out}', pretrained=True).eval(),
              timm.create_model(cfg['architecture'], pretrained=True, pretrained_cfg_overlay=dict(file=str(out/'model.safetensors')),
                                **cfg['model_args']).eval(),
              load_teacher(out/'model.safetensors')]
    with torch.no_grad():
        for m in models: assert torch.equal(m(x), ref)
    with pytest.raises(ValueError, match='load_teacher'): timm.create_model('small_cnn', pretrained=True)   # no weights given


def test_onnx_agrees_with_pytorch_on_digits(exported, digits):
    "onnxruntime on model.onnx against PyTorch on the run's real digits, at batch sizes 1, 7 and 50; the card states the check."
    import onnxruntime as ort
    out, (x, ref) = exported[0], digits
    sess = ort.InferenceSession(str(out/'model.onnx'), providers=['CPUExecutionProvider'])
    assert [i.name for i in sess.get_inputs()] == ['pixel_values'] and sess.get_inputs()[0].shape[0] == 'batch'
    for xb, rb in ((x[:1], ref[:1]), (x[:7], ref[:7]), (x, ref)):
        got = torch.from_numpy(sess.run(['logits'], {'pixel_values': xb.numpy()})[0])
        assert (got - rb).abs().max() <= 1e-5 and torch.equal(got.argmax(1), rb.argmax(1))
    k = json.loads((out/'config.json').read_text())['igdmfast']['onnx']
    assert k['ok'] and k['n'] == 50 and k['argmax_agree'] == 50 and k['max_abs_diff'] <= 1e-5
    card = (out/'README.md').read_text()
    assert f"max |Δ logit| = {k['max_abs_diff']:.3g}" in card and 'the same class on 50 of 50 images' in card
    assert 'White-box attacks (PGD, C&W, AutoAttack) must be run on the PyTorch model' in card


def test_card_and_robustbench_numbers_are_metrics_json(run_aa, exported):
    "Every accuracy, image count and Wilson interval of the card, and RobustBench's clean_acc, come from metrics.json."
    from huggingface_hub import ModelCard
    out = exported[0]
    metrics = json.loads((run_aa/'metrics.json').read_text())
    entry = next(v for k, v in metrics['models'].items() if k.startswith('student'))
    card = ModelCard.load(out/'README.md')   # the front matter parses as the Hub's (model-index included)
    results = {r.metric_args['attack']: r for r in card.data.eval_results}
    assert set(results) == {'clean', 'fgsm', 'pgd20', 'cw', 'aa'}
    for k, r in results.items():
        ci = entry['intervals'][k]
        w = binomial_ci(ci['correct'], ci['n'])
        assert r.metric_value == round(entry['numbers'][k], 2) and (r.metric_args['correct'], r.metric_args['n']) == (ci['correct'], ci['n'])
        assert r.metric_args['wilson_95'] == [round(w['low'], 2), round(w['high'], 2)] and r.metric_args['eps'] == '8/255'
        assert f"| {entry['numbers'][k]:.2f} | {ci['correct']} / {ci['n']} | {w['low']:.1f}–{w['high']:.1f} |" in card.text
    assert entry['intervals']['aa']['n'] == 2 and 'on a seeded subset of 2 of the 50 images' in card.text
    assert 'ARD + IGDM (α = 5)' in card.text and '| Seed | 0 ' in card.text and '| Epochs | 1 |' in card.text
    rb = json.loads((out/'robustbench.json').read_text())
    assert rb['clean_acc'] == f"{entry['numbers']['clean']:.2f}" and rb['eps'] == '8/255' and rb['dataset'] == 'digits'
    assert rb['architecture'] == 'small_cnn' and rb['number_forward_passes'] == 1 and rb['additional_data'] is False
    assert rb['autoattack_acc'] is None and rb['reported'] is None and 'AutoAttack (standard) ran on 2 images only' in rb['footnote']


def test_robustbench_autoattack_only_on_the_full_test_set(run_aa):
    "autoattack_acc is filled when AutoAttack ran on every test image (no --n-valid), null on a subset of them."
    cfg = run_state(run_aa)['cfg']
    entry = next(v for k, v in json.loads((run_aa/'metrics.json').read_text())['models'].items() if k.startswith('student'))
    full = dict(entry, intervals=dict(entry['intervals'], aa=dict(correct=3, n=50)))
    rows = robustness_rows(full, dict(cfg, n_valid=None))
    assert robustbench_info(rows, dict(cfg, n_valid=None), 'small_cnn', 'm')['autoattack_acc'] == '6.00'
    assert robustbench_info(rows, cfg, 'small_cnn', 'm')['autoattack_acc'] is None   # 50 images of a --n-valid subset


def test_run_without_autoattack_exports_and_says_so(tmp_path):
    "AutoAttack skipped (--n-aa 0): exported, the card says AutoAttack was not measured, autoattack_acc is null."
    run = tmp_path/'run'
    rc, _, err = cli('train', *TINY, '--n-aa', 0, '--out', run)
    assert rc == 0, err[-3000:]
    r = export_student(run, tmp_path/'export', onnx=False)
    card = (tmp_path/'export'/'README.md').read_text()
    assert 'AutoAttack not measured' in card and not (tmp_path/'export'/'model.onnx').exists() and r['onnx'] is None
    assert r['robustbench']['autoattack_acc'] is None and 'AutoAttack was not run (--n-aa 0)' in r['robustbench']['footnote']


def test_run_without_metrics(run_aa, tmp_path, digits):
    "No metrics.json: refused; --allow-unfinished exports the weights, and the card claims no robustness."
    run = copy_run(run_aa, tmp_path/'run')
    (run/'metrics.json').unlink()
    refused(['export', run, '--out', tmp_path/'e'], r'has no metrics\.json.*--resume.*--allow-unfinished')
    assert not (tmp_path/'e').exists()
    rc, _, err = cli('export', run, '--out', tmp_path/'e', '--allow-unfinished', '--no-onnx')
    assert rc == 0, err
    card = (tmp_path/'e'/'README.md').read_text()
    assert 'Unfinished run' in card and 'No robustness was measured' in card and 'missing metrics.json' in card
    assert json.loads((tmp_path/'e'/'robustbench.json').read_text())['clean_acc'] is None
    with torch.no_grad(): assert torch.equal(load_student(tmp_path/'e')(digits[0]), digits[1])


def test_half_finished_run(run_aa, tmp_path):
    "A run killed before its student.pt: refused; --allow-unfinished exports the last checkpoint, marked unfinished."
    run = copy_run(run_aa, tmp_path/'run')
    for f in ('student.pt', 'metrics.json'): (run/f).unlink()
    cfg = json.loads((run/'config.json').read_text())
    (run/'config.json').write_text(json.dumps(dict(cfg, epochs=3)))   # killed after 1 of 3 epochs
    refused(['export', run, '--out', tmp_path/'e'], r'half-finished run: 1 of 3 epochs saved in checkpoint\.pt.*--allow-unfinished')
    r = export_student(run, tmp_path/'e', allow_unfinished=True, onnx=False)
    assert not r['finished'] and 'Unfinished run' in (tmp_path/'e'/'README.md').read_text()
    assert 'Unfinished run: 1 of 3 epochs' in r['robustbench']['footnote']


def test_weights_of_another_architecture(run_aa, tmp_path):
    "A student.pt of another architecture than the run's --student is refused."
    from igdmfast.models import tiny_resnet_cifar
    run = copy_run(run_aa, tmp_path/'run')
    save_weights(tiny_resnet_cifar(num_classes=10, in_chans=1), run/'student.pt', arch='tiny_resnet_cifar')
    refused(['export', run, '--out', tmp_path/'e'], r"holds a 'tiny_resnet_cifar' but .* a 'small_cnn' \(--student\)")
    # a checkpoint without an architecture of its own (a half-finished run) that does not fit the run's --student
    for f in ('student.pt', 'metrics.json'): (run/f).unlink()
    torch.save(dict(model=tiny_resnet_cifar(num_classes=10, in_chans=1).state_dict()), run/'checkpoint.pt')
    refused(['export', run, '--out', tmp_path/'e', '--allow-unfinished', '--no-onnx'], r"checkpoint\.pt does not fit the run's --student small_cnn")


def test_existing_out_follows_the_run_folder_rules(run_aa, tmp_path):
    "An --out holding another export, a run, a user's file, or in use is refused; --force replaces an earlier export."
    out = tmp_path/'e'
    assert cli('export', run_aa, '--out', out, '--no-onnx')[0] == 0
    refused(['export', run_aa, '--out', out, '--no-onnx'], r'holds another run \(config\.json of `igdmfast export`\): pass --force')
    rc, stdout, _ = cli('export', run_aa, '--out', out, '--no-onnx', '--force')
    assert rc == 0 and '--force: removed' in stdout
    user = tmp_path/'mine'; user.mkdir(); (user/'README.md').write_text('my notes')
    refused(['export', run_aa, '--out', user, '--no-onnx'], r'holds README\.md, which igdmfast did not write')
    assert (user/'README.md').read_text() == 'my notes'
    refused(['export', run_aa, '--out', run_aa], r'holds another run|is the run folder itself')
    refused(['export', run_aa], r'needs --out DIR')


def test_not_a_run_and_a_run_in_use(run_aa, tmp_path):
    import fcntl
    (tmp_path/'empty').mkdir()
    refused(['export', tmp_path/'empty', '--out', tmp_path/'e'], r'is not an igdmfast run folder')
    refused(['export', tmp_path/'nowhere', '--out', tmp_path/'e'], r'No run folder at')
    run = copy_run(run_aa, tmp_path/'run')
    with open(run/'.igdmfast.lock', 'w') as f:   # a command still running in the run folder
        f.write('4242\n'); f.flush(); fcntl.flock(f, fcntl.LOCK_EX)
        refused(['export', run, '--out', tmp_path/'e'], r'in use by another igdmfast command \(process 4242\)')


def test_missing_extra_names_it(monkeypatch, run_aa, tmp_path):
    "Without onnxruntime the export says which extra to install (and that --no-onnx skips the file)."
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'onnxruntime' else find(name, *a))
    with pytest.raises(ExportError, match=re.escape("pip install -e '.[export]'")): need_onnx()
    refused(['export', run_aa, '--out', tmp_path/'e'], r"needs onnxruntime.*pip install -e '\.\[export\]'.*--no-onnx")
    assert not (tmp_path/'e').exists()
