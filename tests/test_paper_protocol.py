"experiments/paper: every command of the paper's tables matches the spec, parses, and each distinct configuration trains two batches."
import importlib.util, math, shlex, sys
from collections import Counter
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('paper', ROOT / 'experiments' / 'paper' / 'paper.py')
paper = importlib.util.module_from_spec(spec); sys.modules['paper'] = paper; spec.loader.exec_module(paper)

# ---- The spec's tables, transcribed by hand from ../shared/spec/METHOD.md (never read from paper.py) ----
# c.2: the RobustBench names of the CIFAR teachers (the same for CIFAR-10 and CIFAR-100) and their architectures
SPEC_RB = {'LTD': ('Chen2021LTD_WRN34_10', 'wrn34_10'), 'BDM-AT': ('Wang2023Better_WRN-28-10', 'dm_wrn28_10'),
           'IKL-AT': ('Cui2023Decoupled_WRN-28-10', 'dm_wrn28_10')}
# a.3: alpha for PGD-AT, TRADES, ARD, IAD, AKD, RSLAD, AdaAD (AdaIAD shares AdaAD's)
SPEC_ALPHA_COLUMNS = ('pgd_at', 'trades', 'ard', 'iad', 'akd', 'rslad', 'adaad')
SPEC_ALPHA = {
    ('cifar100', 'resnet18', 'LTD'): (100, 5, 50, 20, 50, 3, 15),
    ('cifar100', 'resnet18', 'BDM-AT'): (220, 5, 100, 50, 25, 10, 70),
    ('cifar100', 'resnet18', 'IKL-AT'): (100, 5, 100, 50, 40, 10, 50),
    ('cifar10', 'resnet18', 'LTD'): (60, 20, 5, 50, 7, 0.9, 5),
    ('cifar10', 'resnet18', 'IKL-AT'): (70, 20, 10, 30, 15, 1, 5),
    ('cifar100', 'mobilenetv2', 'LTD'): (150, 10, 70, 20, 30, 3, 20),
    ('cifar100', 'mobilenetv2', 'BDM-AT'): (160, 10, 70, 50, 30, 4, 50),
    ('cifar100', 'mobilenetv2', 'IKL-AT'): (160, 3, 70, 50, 30, 10, 40),
    ('cifar10', 'mobilenetv2', 'LTD'): (70, 1, 10, 50, 15, 0.5, 10),
    ('cifar10', 'mobilenetv2', 'BDM-AT'): (40, 0.5, 8, 50, 15, 0.7, 10),
    ('cifar10', 'mobilenetv2', 'IKL-AT'): (50, 0.2, 9, 50, 15, 0.7, 10),
    ('svhn', 'resnet18', 'PGD-AT'): (60, 30, 50, 40, 10, 3, 9),
}
SPEC_STUDENT = {'resnet18': 'resnet18_cifar', 'mobilenetv2': 'mobilenetv2_cifar'}   # c.2: CIFAR-style students
SPEC_N_TEST = {'cifar100': 10000, 'cifar10': 10000, 'svhn': 26032}                   # c.3: the whole test set
SPEC_CLASSES = {'cifar100': 100, 'cifar10': 10, 'svhn': 10}

def spec_schedule(dataset, method):
    "c.1: epochs and the x0.1 decays."
    if dataset == 'svhn': return 50, [40, 45]
    if method == 'rslad': return 300, [215, 260, 285]
    return 200, [100, 150]

def spec_alpha(dataset, student, teacher, method):
    "a.3; Table 6's IGDM-AdaAD without the teacher in the inner max takes AdaAD's alpha (the spec gives no other)."
    return SPEC_ALPHA[(dataset, student, teacher)][SPEC_ALPHA_COLUMNS.index('adaad' if method == 'adaiad' else method)]

# d.2-d.5: the rows of each method column (AdaAD, AdaIAD, then "+IGDM" on AdaAD); d.7: Table 6's four AdaAD variants
SPEC_COLUMN = [(m, ig, None) for m in ('pgd_at', 'trades', 'ard', 'iad', 'akd', 'rslad') for ig in (False, True)] + \
              [('adaad', False, None), ('adaiad', False, None), ('adaad', True, None)]
SPEC_TABLE6 = [('adaad', False, None), ('adaad', False, 'student_ce'), ('adaad', True, None), ('adaad', True, 'student_ce')]
SPEC_TABLES = {   # table -> its columns (dataset, student, teacher) and rows
    '2': ([('cifar100', 'resnet18', 'BDM-AT'), ('cifar100', 'resnet18', 'LTD')], SPEC_COLUMN),
    '3': ([('cifar10', 'resnet18', 'LTD'), ('svhn', 'resnet18', 'PGD-AT')], SPEC_COLUMN),
    '6': ([('cifar100', 'resnet18', t) for t in ('BDM-AT', 'LTD', 'IKL-AT')], SPEC_TABLE6),
    '10-11': ([(d, 'mobilenetv2', t) for d in ('cifar100', 'cifar10') for t in ('BDM-AT', 'LTD')], SPEC_COLUMN),
    '12-13': ([(d, s, 'IKL-AT') for d in ('cifar100', 'cifar10') for s in ('resnet18', 'mobilenetv2')], SPEC_COLUMN),
}

def spec_rows():
    "{(dataset, student, teacher, method, igdm, inner): tables}: every row of every table, one run per distinct row."
    out = {}
    for t, (columns, variants) in SPEC_TABLES.items():
        for col in columns:
            for v in variants: out.setdefault(col + v, set()).add(t)
    return out

# ---- commands.sh as a user runs it ----
def sh_commands():
    "The `igdmfast` command lines of commands.sh, as token lists (`$TEACHERS` kept verbatim)."
    text = (ROOT / 'experiments' / 'paper' / 'commands.sh').read_text()
    return [shlex.split(l.replace('$TEACHERS', "'$TEACHERS'")) for l in text.splitlines() if l.startswith('igdmfast ')]

def flags(tokens):
    "{flag: value} of `igdmfast CMD --flag value --switch ...` (a switch maps to True)."
    assert tokens[0] == 'igdmfast'
    out, i = {}, 2
    while i < len(tokens):
        assert tokens[i].startswith('--') and tokens[i][2:] not in out, tokens
        if i + 1 < len(tokens) and not tokens[i + 1].startswith('--'): out[tokens[i][2:]] = tokens[i + 1]; i += 2
        else: out[tokens[i][2:]] = True; i += 1
    return out

SVHN_TEACHER_FLAGS = {'data': 'svhn', 'arch': 'wrn34_10', 'method': 'pgd_at', 'protocol': 'paper', 'epochs': '50', 'milestones': '40,45',
                      'bs': '128', 'eps': '8', 'step': '2', 'steps': '10', 'n-aa': '26032', 'seed': '0', 'resume': True}

def teacher_commands(): return [flags(c) for c in sh_commands() if c[1] == 'teacher']
def train_commands(): return [flags(c) for c in sh_commands() if c[1] == 'train']

def expected_flags(dataset, student, teacher, method, igdm, inner, svhn_teacher):
    "The flags (all but --out) of a row's `igdmfast train` command, from the spec alone."
    epochs, ms = spec_schedule(dataset, method)
    f = {'data': dataset, 'student': SPEC_STUDENT[student], 'method': method, 'igdm' if igdm else 'no-igdm': True,
         'protocol': 'paper', 'epochs': str(epochs), 'milestones': ','.join(map(str, ms)), 'bs': '128', 'eps': '8', 'step': '2',
         'steps': '10', 'n-aa': str(SPEC_N_TEST[dataset]), 'seed': '0', 'resume': True}
    f.update({'teacher': SPEC_RB[teacher][0], 'teacher-dir': '$TEACHERS'} if teacher in SPEC_RB else {'teacher': svhn_teacher})
    if igdm: f['alpha'] = spec_alpha(dataset, student, teacher, method)
    if inner: f['inner'] = inner
    return f

def row_key(f):
    "(dataset, student, teacher, method, igdm, inner) of a parsed train command."
    teacher = {n: t for t, (n, _) in SPEC_RB.items()}.get(f['teacher'], 'PGD-AT' if f['data'] == 'svhn' else f['teacher'])
    student = {a: s for s, a in SPEC_STUDENT.items()}[f['student']]
    return (f['data'], student, teacher, f['method'], 'igdm' in f, f.get('inner'))


@pytest.fixture(scope='module')
def teachers():
    "Small stand-in teachers, one per class count: the real ones are replaced in a dry run anyway."
    return {n: paper.stand_in_teacher(n) for n in (10, 100)}


def test_commands_sh_is_current():
    assert (ROOT / 'experiments' / 'paper' / 'commands.sh').read_text() == paper.commands_sh(), \
        'run `python experiments/paper/paper.py --write`'


def test_rows_cover_every_table():
    rows, want = paper.rows(), spec_rows()
    assert len(rows) == len(want) == 186   # 192 table rows; Table 6's AdaAD and IGDM-AdaAD are runs of Tables 2, 12-13
    assert {(r.dataset, r.student, r.teacher, r.method, r.igdm, r.inner) for r in rows} == set(want)
    assert {r.student for r in rows} == {'resnet18', 'mobilenetv2'}
    assert len({r.name for r in rows}) == len(rows)   # one run folder per row
    per_table = Counter(t for ts in want.values() for t in ts)
    assert per_table == {'2': 30, '3': 30, '6': 12, '10-11': 60, '12-13': 60}
    assert Counter(t for t, _ in paper.table_rows()) == per_table


def test_every_command_is_the_spec_row():
    "Each row of each table has exactly one command in commands.sh, with the spec's teacher, schedule, alpha and inner max."
    (svhn_t,) = teacher_commands()
    svhn_file = f"{svhn_t['out']}/teacher.pt"
    cmds = train_commands()
    keys, want = Counter(row_key(f) for f in cmds), Counter(list(spec_rows()))
    assert keys == want, (keys - want, want - keys)   # every row once, nothing else
    for f in cmds:
        got = {k: v for k, v in f.items() if k != 'out'}
        if 'alpha' in got: got['alpha'] = float(got['alpha'])
        assert got == expected_flags(*row_key(f), svhn_file), f
    outs = [f['out'] for f in cmds] + [svhn_t['out']]
    assert len(set(outs)) == len(outs) and all(o.startswith('runs/paper/') for o in outs)


def test_svhn_teacher_is_trained_first():
    "Table 3's SVHN teacher: one `igdmfast teacher` command (PGD-AT WRN-34-10, SVHN's schedule) before any run that reads it."
    (t,) = teacher_commands()
    assert {k: v for k, v in t.items() if k != 'out'} == SVHN_TEACHER_FLAGS
    lines = sh_commands()
    first_svhn = min(i for i, c in enumerate(lines) if c[1] == 'train' and flags(c)['data'] == 'svhn')
    assert [i for i, c in enumerate(lines) if c[1] == 'teacher'] == [0] and first_svhn > 0
    assert {f['teacher'] for f in train_commands() if f['data'] == 'svhn'} == {f"{t['out']}/teacher.pt"}
    res = paper.dry_run_teacher()
    assert (res['arch'], res['n_classes'], res['epochs'], res['sched']['milestones']) == ('wrn34_10', 10, 50, [40, 45])
    assert res['method'].name == 'pgd_at' and not res['method'].uses_teacher
    assert res['threat'].eps == 8 / 255 and res['threat'].step_size == 2 / 255 and res['threat'].n_steps == 10
    assert str(res['file']) == f"{t['out']}/teacher.pt"   # where `igdmfast teacher` saves it


def test_every_teacher_resolves(tmp_path):
    "Every command's --teacher parses and names the checkpoint igdmfast reads: RobustBench's layout, the spec's architecture."
    from igdmfast import cli
    from igdmfast.models import ROBUSTBENCH_TEACHERS
    parser = cli._parser()
    for r in paper.rows():
        args = parser.parse_args(r.argv(teachers=str(tmp_path)))
        assert args.teacher_arch is None   # igdmfast knows the architecture of every name
        if r.teacher in SPEC_RB:
            name, arch = SPEC_RB[r.teacher]
            assert paper.teacher_path(args) == tmp_path / r.dataset / 'Linf' / f'{name}.pt'
            assert ROBUSTBENCH_TEACHERS[r.dataset][name]['arch'] == arch
            assert ROBUSTBENCH_TEACHERS[r.dataset][name]['kwargs']['num_classes'] == SPEC_CLASSES[r.dataset]
        else: assert paper.teacher_path(args) == Path(paper.svhn_teacher_file())


def test_dry_runs_cover_every_configuration():
    "One dry run per distinct training configuration: rows that differ only in the teacher (and so alpha) share one."
    configs = {(d, s, m, ig, inner) for d, s, t, m, ig, inner in spec_rows()}
    assert len(configs) == 77 and len(paper.configs()) == 77
    assert {r.config for r in paper.configs()} == configs


@pytest.mark.parametrize('row', paper.configs(), ids=lambda r: r.name)
def test_dry_run(row, teachers, tmp_path):
    model = teachers[SPEC_CLASSES[row.dataset]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = paper.dry_run(row, model, tmp_path, teachers=str(tmp_path / 'teachers'))
    epochs, milestones = spec_schedule(row.dataset, row.method)
    assert len(res['losses']) == 2 and all(math.isfinite(l) for l in res['losses']), res
    assert res['alpha'] == (spec_alpha(row.dataset, row.student, row.teacher, row.method) if row.igdm else None)
    assert (res['method'], res['igdm'], res['inner']) == (row.method, row.igdm, row.inner)
    assert res['n_classes'] == SPEC_CLASSES[row.dataset]
    assert res['opt'] == 'Optimizer' and res['lr'] == 0.1 and res['epochs'] == epochs
    assert res['milestones'] == milestones   # the decays land on exactly the paper's epochs
    assert res['threat'].eps == 8 / 255 and res['threat'].step_size == 2 / 255 and res['threat'].n_steps == 10
    if row.teacher in SPEC_RB:
        assert res['teacher_path'] == tmp_path / 'teachers' / row.dataset / 'Linf' / f'{SPEC_RB[row.teacher][0]}.pt'
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the teacher is never changed
