"The README's main job, exactly as its first command runs it: `igdmfast train` with no option, in a fresh folder."
import json, os, subprocess, sys
from pathlib import Path


def natural_pgd20(student, seed=0, epochs=10):
    "PGD-20 accuracy of `student` trained naturally (no attack) on the default data with the CLI's defaults."
    import timm, torch
    import fastai.callback.schedule, fastai.callback.progress  # noqa: F401 (they add Learner.fit_one_cycle and no_bar)
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from torch.nn import CrossEntropyLoss
    import igdmfast.models  # noqa: F401
    from igdmfast.core import seed_everything
    from igdmfast.data import get_dls
    from igdmfast.evaluate import robust_eval
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))   # the CLI subprocess's thread count
    seed_everything(seed)
    dls = get_dls('digits', bs=128, seed=seed)
    model = timm.create_model(student, num_classes=dls.c, in_chans=dls.in_chans)
    learn = Learner(dls, model, loss_func=CrossEntropyLoss(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 3e-3)
    return robust_eval(learn.model, dls.valid, attacks=('clean', 'pgd20'), seed=seed, progress=False, warn=False)


def test_main_job_as_in_the_readme(tmp_path):
    "`igdmfast train` with no option, as the README's first command runs it: every file of the run folder, a robust student."
    r = subprocess.run([str(Path(sys.executable).parent / 'igdmfast'), 'train'], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, MPLBACKEND='Agg'), timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '| model | Clean | FGSM | PGD-20 | C&W∞ | AA | GD | GC |' in r.stdout
    out = tmp_path / 'runs' / 'train'
    for f in ('teacher.pt', 'student.pt', 'checkpoint.pt', 'teacher_checkpoint.pt', 'history.csv', 'teacher_history.csv',
              'config.json', 'metrics.json', 'report.md', 'grad_cosines.png', 'training_curves.png'):
        assert (out / f).exists(), f
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['command'] == 'train' and cfg['seed'] == 0 and cfg['method'] == 'adaad' and cfg['igdm']
    assert set(cfg['versions']) >= {'igdmfast', 'torch', 'fastai'}
    assert 'igdm_loss' in (out / 'history.csv').read_text().splitlines()[0]
    assert len((out / 'history.csv').read_text().splitlines()) == 1 + cfg['epochs']
    models = json.loads((out / 'metrics.json').read_text())['models']
    for name, m in models.items():
        n = m['numbers']
        assert n['pgd20'] <= n['clean'] and n['cw'] <= n['clean'] and 0 <= n['aa'] <= 100, (name, n)
    student = [m['numbers'] for name, m in models.items() if name.startswith('student')][0]
    assert -1 <= student['gc'] <= 1 and student['gd'] >= 0
    natural = natural_pgd20(cfg['student'], epochs=cfg['epochs'])
    assert natural['clean'] > 50, natural   # the natural student did learn the task ...
    assert student['pgd20'] >= natural['pgd20'] + 15, (student, dict(natural))   # ... but only the distilled one is robust
    from igdmfast.models import load_teacher
    for f in ('teacher.pt', 'student.pt'):   # both load safely and rebuild themselves
        assert not any(p.requires_grad for p in load_teacher(out / f).parameters())
