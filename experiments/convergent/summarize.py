#!/usr/bin/env python
"""The results of the pre-registered grid (`grid.sh`), read from its run folders: `results.md`, `results.json`, plots.

Usage (from the repository root):  .venv/bin/python experiments/convergent/summarize.py
Every number comes from a run folder's `metrics.json` (clean / FGSM / PGD-20 / C&W of `train`, on all 360 validation
images) and its `_aa` folder (AutoAttack of `igdmfast eval`, all 360). The statistics are `igdmfast.stats`: mean and
Student t interval over seeds, the paired t interval of IGDM − base per seed, the Wilson interval of each accuracy.
A block whose runs are not all finished is summarized over the seeds that are (it says which), never padded.
"""
import json, sys
from igdmfast.core import atomic_write
from pathlib import Path

HERE = Path(__file__).resolve().parent
GRID = HERE/'grid'
SEEDS = (0, 1, 2, 3, 4)
ALPHAS = (0, 1, 2, 5, 10, 20, 50)      # the sweep of grid.sh (5: the main grid's ARD+IGDM)
METRICS = ('clean', 'fgsm', 'pgd20', 'cw', 'aa', 'seconds_per_epoch')
# runs that resumed from a checkpoint in a later process, and the epoch they resumed at: their metrics.json counts the
# seconds of that last process only (README.md, "Running the grid: a log")
RESUMED = {'gate/adaad_e320': 202, 'alpha/ard_igdm_a2_s1': 102, 'alpha/ard_igdm_a10_s1': 73}
GATE_RULE = 5.0                         # points of PGD-20 or AA gained from 160 to 320 epochs that switch the grid to 320

def _student(m:dict)->dict:
    "The student's numbers of a `train` metrics.json."
    k = next(k for k in m['models'] if k.startswith('student'))
    return m['models'][k]['numbers']

def run_row(name:str, # a run folder under grid/, e.g. 'main/ard_igdm_s3'
           )->dict|None:
    "One finished run (train and its AutoAttack) as a row for `igdmfast.stats`, or None while it is not finished."
    d, a = GRID/name, GRID/f'{name}_aa'
    if not (d/'metrics.json').is_file() or not (a/'metrics.json').is_file(): return None
    m, aa = json.loads((d/'metrics.json').read_text()), json.loads((a/'metrics.json').read_text())
    cfg, nums = m['extra']['config'], _student(m)
    aa_nums = next(iter(aa['models'].values()))['numbers']
    if abs(aa_nums['clean'] - nums['clean']) > 1e-9:
        raise ValueError(f"{name}: the AutoAttack run's clean accuracy {aa_nums['clean']} is not the training run's {nums['clean']}: "
                         "it evaluated another checkpoint.")
    return dict(name=name, method=cfg['method'], igdm=bool(cfg['igdm']), seed=cfg['seed'], alpha=cfg.get('alpha_used'),
                inner=cfg.get('inner'), epochs=cfg['epochs'], clean=nums['clean'], fgsm=nums['fgsm'], pgd20=nums['pgd20'],
                cw=nums['cw'], aa=aa_nums['aa'], n=360, n_aa=360,
                seconds_per_epoch=m['extra']['seconds']['student'] / (cfg['epochs'] - RESUMED.get(name, 0)))

def gate_table(epochs=(160, 320))->tuple[str, dict]:
    "The convergence gate: base students of seed 0 at 160 and 320 epochs, and the rule's verdict."
    rows, verdict = {}, {}
    md = "| student | epochs | clean | PGD-20 | AA | s/epoch |\n|---|---|---|---|---|---|\n"
    for m in ('ard', 'adaad', 'pgd_at'):
        for e in epochs:
            r = run_row(f'gate/{m}_e{e}')
            rows[m, e] = r
            md += (f"| {m} | {e} | " + ('not finished | | | |' if r is None else
                   f"{r['clean']:.2f} | {r['pgd20']:.2f} | {r['aa']:.2f} | {r['seconds_per_epoch']:.2f} |") + "\n")
        a, b = rows[m, epochs[0]], rows[m, epochs[1]]
        if a and b: verdict[m] = dict(pgd20=b['pgd20'] - a['pgd20'], aa=b['aa'] - a['aa'])
    done = len(verdict) == 3
    switch = any(v['pgd20'] > GATE_RULE or v['aa'] > GATE_RULE for v in verdict.values())
    md += "\n" + "".join(f"- {m}: 160 → 320 epochs: PGD-20 {v['pgd20']:+.2f}, AA {v['aa']:+.2f} points\n" for m, v in verdict.items())
    md += ("\n**Gate: " + (f"a student gained more than {GATE_RULE:g} points: the grid trains 320 epochs.**" if switch else
           f"no student gained more than {GATE_RULE:g} points: the grid trains 160 epochs.**") + "\n" if done else
           "\nThe gate is not finished.\n")
    return md, dict(rows={f'{m}_e{e}': r for (m, e), r in rows.items()}, deltas=verdict, finished=done,
                    epochs=(320 if switch else 160) if done else None)

def _history(name:str)->dict:
    "A run's per-epoch training loss and clean validation accuracy (%) from its `history.csv` (fastai's CSVLogger)."
    import csv
    with open(GRID/name/'history.csv') as f: rows = list(csv.DictReader(f))
    return dict(epoch=[int(r['epoch']) + 1 for r in rows], train_loss=[float(r['train_loss']) for r in rows],
                clean=[100 * float(r['accuracy']) for r in rows])

def gate_figure(gate:dict, epochs=(160, 320)):
    "The gate's training curves (loss, clean accuracy per epoch) and its robust accuracies at 160 and 320 epochs."
    import matplotlib; matplotlib.use('Agg')
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 3.6), layout='constrained')
    ax_loss, ax_clean, ax_rob = fig.subplots(1, 3)
    for i, m in enumerate(('ard', 'adaad', 'pgd_at')):
        for e, ls in zip(epochs, ('-', ':')):
            if not (GRID/f'gate/{m}_e{e}'/'history.csv').is_file(): continue
            h = _history(f'gate/{m}_e{e}')
            ax_loss.plot(h['epoch'], h['train_loss'], ls, color=f'C{i}', lw=1, label=f'{m}, {e} epochs')
            ax_clean.plot(h['epoch'], h['clean'], ls, color=f'C{i}', lw=1, label=f'{m}, {e} epochs')
        for k, mk in (('pgd20', 'o'), ('aa', 's')):
            pts = [(e, gate['rows'][f'{m}_e{e}'][k]) for e in epochs if gate['rows'].get(f'{m}_e{e}')]
            if pts: ax_rob.plot(*zip(*pts), mk + '-', color=f'C{i}', label=f"{m} {'PGD-20' if k == 'pgd20' else 'AA'}")
    ax_loss.set_yscale('log'); ax_loss.set_ylabel('training loss (the method\'s outer loss)')
    ax_clean.set_ylim(90, 100); ax_clean.set_ylabel('clean validation accuracy (%)')
    ax_rob.set_xticks(list(epochs)); ax_rob.set_ylabel('robust accuracy at the end (%)')
    for ax in (ax_loss, ax_clean, ax_rob): ax.set_xlabel('epoch'); ax.grid(alpha=0.3); ax.legend(fontsize=7)
    fig.suptitle('The convergence gate, seed 0: training curves (one-cycle schedule) and robust accuracy at 160 and 320 epochs')
    return fig

def _rows(names):
    rows = [run_row(n) for n in names]
    return [r for r in rows if r is not None]

def _paired_seeds(rows, *keys):
    "The seeds for which every variant in `keys` ((method, igdm, tag) tuples) has a row."
    have = {}
    for r in rows: have.setdefault(r['_key'], set()).add(r['seed'])
    return [s for s in SEEDS if all(s in have.get(k, ()) for k in keys)]

def main_block():
    "ARD, RSLAD, AdaAD ± IGDM and PGD-AT, seeds 0-4."
    from igdmfast.stats import aggregate_compare, compare_markdown, plot_seeds
    names = [f'main/{m}{v}_s{s}' for s in SEEDS for m in ('ard', 'rslad', 'adaad') for v in ('', '_igdm')]
    names += [f'main/pgd_at_s{s}' for s in SEEDS]
    rows = _rows(names)
    if not rows: return "No run of the main grid is finished yet.\n", None, None
    complete = [s for s in SEEDS if sum(r['seed'] == s for r in rows) == 7]
    rows = [r for r in rows if r['seed'] in complete]
    if not rows: return "No seed of the main grid has all 7 variants finished yet.\n", None, None
    agg = aggregate_compare(rows, metrics=METRICS)
    md = (f"Seeds with all 7 variants finished: {complete} (of {list(SEEDS)}). Every accuracy on all 360 validation images.\n\n"
          + compare_markdown(agg))
    draw = lambda path: plot_seeds(agg, path, metrics=('clean', 'pgd20', 'aa'),
                                   title=f"Digits, Linf 64/255: seeds {', '.join(map(str, complete))}")
    return md, agg, draw

def alpha_block():
    "ARD + IGDM with α ∈ ALPHAS against the ARD base of the same seed."
    from igdmfast.stats import mean_ci, paired_diff
    import matplotlib; matplotlib.use('Agg')
    from matplotlib.figure import Figure
    base = {r['seed']: r for r in _rows([f'main/ard_s{s}' for s in SEEDS])}
    runs = {}
    for a in ALPHAS:
        names = [f'main/ard_igdm_s{s}' if a == 5 else f'alpha/ard_igdm_a{a}_s{s}' for s in SEEDS]
        runs[a] = {r['seed']: r for r in _rows(names)}
    out, md = {}, ("| α | seeds | clean | PGD-20 | AA | AA − base (paired) | signs +/−/0 |\n|---|---|---|---|---|---|---|\n")
    for a in ALPHAS:
        ss = [s for s in SEEDS if s in runs[a] and s in base]
        if not ss: md += f"| {a} | 0 | not finished | | | | |\n"; continue
        e = {k: mean_ci([runs[a][s][k] for s in ss]) for k in ('clean', 'pgd20', 'aa')}
        d = paired_diff([runs[a][s]['aa'] for s in ss], [base[s]['aa'] for s in ss])
        hw = lambda x: '' if x['half_width'] is None else f" ± {x['half_width']:.2f}"
        ci = '' if d['low'] is None else f" [{d['low']:+.2f}, {d['high']:+.2f}]"
        md += (f"| {a} | {len(ss)} | " + ' | '.join(f"{e[k]['mean']:.2f}{hw(e[k])}" for k in ('clean', 'pgd20', 'aa'))
               + f" | {d['mean']:+.2f}{ci} | {d['positive']}/{d['negative']}/{d['zero']} |\n")
        out[a] = dict(seeds=ss, **{k: e[k] for k in e}, aa_minus_base=d)
    fig = None
    if out:
        fig = Figure(figsize=(9, 3.6), layout='constrained')
        axs = fig.subplots(1, 2)
        for ax, k in zip(axs, ('pgd20', 'aa')):
            xs = list(out)
            ax.errorbar(range(len(xs)), [out[a][k]['mean'] for a in xs], yerr=[out[a][k]['half_width'] or 0 for a in xs],
                        fmt='o-', capsize=4, label='ARD + IGDM')
            for i, a in enumerate(xs):
                ax.scatter([i] * len(out[a]['seeds']), [runs[a][s][k] for s in out[a]['seeds']], s=10, color='C0', alpha=0.4)
            bs = sorted(base)
            if bs:
                b = mean_ci([base[s][k] for s in bs])
                ax.axhline(b['mean'], color='C3', ls='--', label=f"ARD base ({len(bs)} seeds)")
                if b['half_width']: ax.axhspan(b['mean'] - b['half_width'], b['mean'] + b['half_width'], color='C3', alpha=0.1)
            ax.set_xticks(range(len(xs)), [str(a) for a in xs]); ax.set_xlabel('IGDM α')
            ax.set_ylabel(f"{'PGD-20' if k == 'pgd20' else 'AutoAttack'} accuracy (%)"); ax.grid(alpha=0.3); ax.legend(fontsize=8)
        fig.suptitle('ARD + IGDM against α: mean ± 95% t interval over seeds (dots: seeds)')
    return md, out, _saver(fig)

COST = HERE/'cost.json'   # `python bench/bench_table6.py --json experiments/convergent/cost.json`

def _cost():
    "The one-machine timing of the four Table 6 variants, when it has been measured."
    return json.loads(COST.read_text()) if COST.is_file() else None

def table6_block():
    "AdaAD with its own and with the teacher-free inner maximization, each ± IGDM: AA against seconds per epoch."
    from igdmfast.stats import mean_ci, paired_diff
    import matplotlib; matplotlib.use('Agg')
    from matplotlib.figure import Figure
    variants = {'AdaAD': 'main/adaad_s{}', 'AdaAD + IGDM': 'main/adaad_igdm_s{}',
                'AdaAD, teacher-free inner': 'table6/adaad_tf_s{}', 'AdaAD, teacher-free inner + IGDM': 'table6/adaad_tf_igdm_s{}'}
    runs = {v: {r['seed']: r for r in _rows([p.format(s) for s in SEEDS])} for v, p in variants.items()}
    ss = [s for s in SEEDS if all(s in runs[v] for v in variants)]
    if not ss: return "No seed has all four Table 6 variants finished yet.\n", None, None
    out = {v: {k: mean_ci([runs[v][s][k] for s in ss]) for k in ('clean', 'pgd20', 'aa', 'seconds_per_epoch')} for v in variants}
    hw = lambda x, d=2: f"{x['mean']:.{d}f}" + ('' if x['half_width'] is None else f" ± {x['half_width']:.{d}f}")
    md = f"Seeds {ss}. Mean ± 95% t interval over seeds.\n\n| variant | clean | PGD-20 | AA | s/epoch |\n|---|---|---|---|---|\n"
    for v in variants:
        md += f"| {v} | {hw(out[v]['clean'])} | {hw(out[v]['pgd20'])} | {hw(out[v]['aa'])} | {hw(out[v]['seconds_per_epoch'], 1)} |\n"
    def paired(a, b, note=''):
        "AA of variant `a` minus variant `b`, paired by seed, and its line for the Markdown."
        d = paired_diff([runs[a][s]['aa'] for s in ss], [runs[b][s]['aa'] for s in ss])
        ci = '' if d['low'] is None else f" [{d['low']:+.2f}, {d['high']:+.2f}]"
        return d, (f"\n- {a} − {b}, AA paired by seed{note}: {d['mean']:+.2f}{ci} points "
                   f"(signs +/−/0: {d['positive']}/{d['negative']}/{d['zero']})")
    diffs, inner = {}, {}   # IGDM − base per inner; the teacher-free inner − AdaAD's own (descriptive, same seeds)
    for base, ig in (('AdaAD', 'AdaAD + IGDM'), ('AdaAD, teacher-free inner', 'AdaAD, teacher-free inner + IGDM')):
        diffs[ig], line = paired(ig, base); md += line
    for own, tf in (('AdaAD', 'AdaAD, teacher-free inner'), ('AdaAD + IGDM', 'AdaAD, teacher-free inner + IGDM')):
        inner[tf], line = paired(tf, own, ' (descriptive, not a pre-registered contrast)'); md += line
    cost = _cost()
    if cost:
        md += (f"\n\nCost measured on one machine in one run (`bench/bench_table6.py`, {cost['epochs']} epochs per fit, median of "
               f"{cost['repeats']} interleaved rounds; {cost['machine']['cpu']}, {cost['machine']['threads']} thread):\n\n"
               "| variant | s/epoch | × AdaAD |\n|---|---|---|\n"
               + "".join(f"| {r['variant']} | {r['s_per_epoch']:.2f} | {r['vs_adaad']:.2f} |\n" for r in cost['rows']))
    fig = Figure(figsize=(6, 4), layout='constrained'); ax = fig.subplots()
    for i, v in enumerate(variants):
        e = out[v]['aa']
        if cost: x, xerr = next(r['s_per_epoch'] for r in cost['rows'] if r['variant'] == v), 0
        else: x, xerr = out[v]['seconds_per_epoch']['mean'], out[v]['seconds_per_epoch']['half_width'] or 0
        ax.errorbar([x], [e['mean']], xerr=[xerr], yerr=[e['half_width'] or 0], fmt='os'[i % 2],
                    color=f'C{i // 2}', capsize=4, label=v)
    ax.set_xlabel('seconds per epoch (one thread; ' + ('bench_table6.py, one machine)' if cost else "the grid's runs)"))
    ax.set_ylabel('AutoAttack accuracy (%)'); ax.grid(alpha=0.3)
    ax.legend(fontsize=8); ax.set_title(f'Table 6 at CPU scale: mean ± 95% t interval, seeds {ss}', fontsize=9)
    return md + "\n", dict(seeds=ss, variants=out, differences=diffs, inner_differences=inner,
                     cost=cost and cost['rows']), _saver(fig)

BN_CHECK = HERE/'bn_check.json'   # `bn_check.py`: an exploratory check outside the grid

def bn_block():
    "The exploratory BatchNorm check (`bn_check.py`): each student's numbers before and after recalibrating its statistics."
    if not BN_CHECK.is_file(): return "Not run yet.\n", None, None
    r = json.loads(BN_CHECK.read_text())
    label = {'recorded': "the run's own", 'before': 'recomputed here', 'adv': "on x′ (what ARD forwards)",
             'adv+minus': "on x′ and x − δ (what the IGDM path forwards)", 'clean': 'on clean x'}
    md = ("Outside the pre-registered grid, exploratory, two seeds: the plan is in `bn_check.py`'s docstring. Accuracy "
          "in % on all 360 validation images; BatchNorm statistics as trained or recalibrated (weights unchanged).\n\n"
          "| run | statistics | clean | PGD-20 | AA |\n|---|---|---|---|---|\n")
    for name, v in r.items():
        for k in ('recorded', 'before', 'adv', 'adv+minus', 'clean'):
            if k in v: md += (f"| {name} | {label[k]} | {v[k]['clean']:.2f} | {v[k]['pgd20']:.2f} | "
                              + (f"{v[k]['aa']:.2f} |" if 'aa' in v[k] else "|") + "\n")
    keep_md, keep = bn_keep_table()
    return md + keep_md, dict(recalibration=r, keep=keep), None

BN_VARIANTS = {'ARD': 'main/ard_s{}', 'ARD+IGDM α=5': 'main/ard_igdm_s{}', 'ARD+IGDM α=5, --igdm-bn keep': 'bn/ard_igdm_a5_keep_s{}',
               'ARD+IGDM α=0': 'alpha/ard_igdm_a0_s{}', 'ARD+IGDM α=0, --igdm-bn keep': 'bn/ard_igdm_a0_keep_s{}'}

def bn_keep_table(seeds=(0, 1))->tuple[str, dict]:
    "The exploratory runs of `grid.sh bn` beside the official-path runs and the base of the same seeds: AA, PGD-20, clean."
    from igdmfast.stats import paired_diff
    rows = {v: {s: run_row(p.format(s)) for s in seeds} for v, p in BN_VARIANTS.items()}
    if not any(rows[v][s] for v in BN_VARIANTS if 'keep' in v for s in seeds): return "\nThe `grid.sh bn` runs have not finished yet.\n", None
    md = ("\nTrained with `--igdm-bn keep` (`grid.sh bn`, exploratory, library at `bef67cc`), beside the same seeds' base and "
          "official-path runs. AA (PGD-20, clean); the last column is AA − ARD, paired by seed:\n\n"
          "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | AA − ARD (mean over seeds) |\n|---|" + "---|" * len(seeds) + "---|\n")
    out = {}
    for v in BN_VARIANTS:
        cells = [f"{r['aa']:.2f} ({r['pgd20']:.2f}, {r['clean']:.2f})" if (r := rows[v][s]) else "not finished" for s in seeds]
        ss = [s for s in seeds if rows[v][s] and rows['ARD'][s]]
        d = paired_diff([rows[v][s]['aa'] for s in ss], [rows['ARD'][s]['aa'] for s in ss]) if ss and v != 'ARD' else None
        out[v] = dict(seeds={s: rows[v][s] and {k: rows[v][s][k] for k in ('clean', 'pgd20', 'aa')} for s in seeds}, aa_minus_ard=d)
        md += f"| {v} | " + " | ".join(cells) + f" | {'' if d is None else format(d['mean'], '+.2f') + f' ({len(ss)} seed' + 's' * (len(ss) > 1) + ')'} |\n"
    return md, out

def _saver(fig):
    "A function that writes `fig` as a PNG at a path (None without a figure)."
    return None if fig is None else (lambda path: atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=110)))

def as_json(x):
    "`x` as `results.json` holds it (tuples become lists, anything else unknown to JSON a string)."
    return json.loads(json.dumps(x, default=str))

def collect()->dict:
    "Every block's Markdown, numbers and figure-writer, read from the run folders; writes nothing."
    teacher = json.loads((GRID/'teacher'/'metrics.json').read_text())
    t = next(iter(teacher['models'].values()))['numbers']
    t_aa = next(iter(json.loads((GRID/'teacher_aa'/'metrics.json').read_text())['models'].values()))['numbers']['aa']
    gate_md, gate = gate_table()
    blocks = dict(gate=(gate_md, gate, _saver(gate_figure(gate))), main=main_block(), alpha=alpha_block(), table6=table6_block(), bn=bn_block())
    md = {k: b[0] for k, b in blocks.items()}
    md['teacher'] = f"Teacher (`grid/teacher`, `grid/teacher_aa`): clean {t['clean']:.2f}, PGD-20 {t['pgd20']:.2f}, AA {t_aa:.2f} (360 images).\n"
    data = dict(teacher=dict(**t, aa=t_aa), **{k: b[1] for k, b in blocks.items()})
    return dict(md=md, data=data, figures={k: b[2] for k, b in blocks.items() if b[2] is not None})

FIGURES = dict(gate='gate_curves.png', main='main_seeds.png', alpha='alpha_sweep.png', table6='table6.png')

def summarize()->dict:
    "Write results.md, results.json and the plots from the finished runs; return the numbers written."
    c = collect()
    md, figs = c['md'], c['figures']
    for k, draw in figs.items(): draw(HERE/FIGURES[k])
    img = lambda k: f"\n![{k}]({FIGURES[k]})\n" if k in figs else ''
    text = ("# The convergent digits grid: results\n\nWritten by `summarize.py` from the run folders under `grid/` (do not edit by "
            "hand). Setting and pre-registration: `README.md`.\n\n" + md['teacher'] + "\n"
            f"## Convergence gate\n\n{md['gate']}{img('gate')}\n## Main grid\n\n{md['main']}{img('main')}\n## α sweep (ARD + IGDM)\n\n"
            f"{md['alpha']}{img('alpha')}\n## Table 6 at CPU scale\n\n{md['table6']}{img('table6')}\n"
            f"## Exploratory: BatchNorm's running statistics\n\n{md['bn']}")
    atomic_write(HERE/'results.md', lambda f: f.write(text.encode()))
    atomic_write(HERE/'results.json', lambda f: f.write(json.dumps(c['data'], indent=1, default=str).encode()))
    return c['data']

if __name__ == '__main__':
    summarize()
    print((HERE/'results.md').read_text())
