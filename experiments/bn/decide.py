#!/usr/bin/env python
"""Issue #26's pilot choice and decision, read from the run folders of `grid.sh`: `results.md` and `decision.json`.

Usage (from the repository root):  .venv/bin/python experiments/bn/decide.py
Every number comes from a run folder's `metrics.json` (clean / FGSM / PGD-20 / C&W / GD / GC of `train`, on all 360
validation images) and its `_aa` folder (AutoAttack of `igdmfast eval`, all 360). The rules are README.md's, written
before any run: the pilot rule picks VARIANT; the decision rule sets the default of `igdm_bn`, and is applied only once
every setting has all its seeds. Until then `decision.json` says so and keeps today's default ('update', what the rule
gives when its conditions are not met). Nothing here is typed by hand: rerun it after each finished run.
"""
import json
from pathlib import Path
from igdmfast.core import atomic_write
from igdmfast.stats import paired_diff, mean_ci

HERE = Path(__file__).resolve().parent
RUNS = HERE/'runs'
COMMIT = 'af87a3c'
CANDIDATES = ('keep', 'recalibrate', 'eval')   # in the order of cost: a tie goes to the first
PILOT_SEEDS, TIE = (100, 101), 1.0             # the pilot's seeds; candidates within TIE points of the best are tied
NON_INFERIOR = -1.0                            # rule 1: mean(VARIANT − update) above this, every method and setting
# the settings of README.md: name -> (folder, data, eps, methods of the rule, the seeds it needs, the IGDM alpha per method)
SETTINGS = {'digits': dict(folder='digits', data='digits', eps='64/255', methods=('ard', 'rslad', 'adaad'), seeds=(0, 1, 2, 3, 4),
                          # reported, not in the rule: label -> (run prefix, VARIANT's tag, the update tag, the base tag)
                          extra={'ARD, α = 1': ('ard', '_igdm_{v}_a1', '_igdm_update', ''),
                                 'ARD, α = 20': ('ard', '_igdm_{v}_a20', '_igdm_update', ''),
                                 "Table 6 (AdaAD, teacher-free inner)": ('adaad_tf', '_igdm_{v}', '_igdm_update', '')})}
SETTING2_SEEDS, SETTING2_METHODS = (0, 1, 2), ('ard', 'adaad')

def setting2()->tuple[dict|None, str|None]:
    "Setting 2's SETTINGS entry from its gates (`gates_cifar.json`, written by gates.py), or None and why not (yet)."
    f = HERE/'gates_cifar.json'
    if not f.is_file(): return None, None
    g = json.loads(f.read_text())
    if g['outcome'].startswith('no teacher passes'):
        return None, f"setting 2 cannot be run on this machine: no teacher of the CIFAR-10 plan passed its gate ({g['outcome']})"
    t, c = g['teacher'], g['convergence'] or {}
    if t is None or not c.get('passes'): return None, None   # its gates are not through yet
    return dict(folder=f"cifar/size_n{g['n']}_e{g['e']}/{t['folder'].replace('teacher_', 'students_', 1)}", eps='8/255',
                data=(f"CIFAR-10 subset, {g['n']} training images, {g['e']} epochs, teacher {t['arch']} ({t['epochs']} "
                      f"epochs on {t['n_train']} images)"),
                methods=SETTING2_METHODS, seeds=SETTING2_SEEDS, same_images=False), None

def all_settings()->dict:
    "SETTINGS with setting 2 once its gates have chosen it (name -> its entry)."
    s2, _ = setting2()
    return {**SETTINGS, **({'cifar': s2} if s2 else {})}

RULE = ("The default igdm_bn becomes VARIANT iff (1) in both settings and for every method, the mean of AA(VARIANT) - "
        "AA(update), paired by seed, is above -1 point, and (2) in at least one setting the 95% paired t interval of that "
        "difference lies above 0 for every method; otherwise it stays 'update'. protocol='paper' keeps 'update' always.")

def _student(m:dict)->dict:
    "The student's numbers of a `train` metrics.json."
    return m['models'][next(k for k in m['models'] if k.startswith('student'))]['numbers']

def run_row(name:str, # a run folder under runs/, e.g. 'pilot/ard_igdm_keep_s100'
            same_images:bool=True, # the AutoAttack run attacked the training run's validation images (setting 1: all 360)
           )->dict|None:
    "One finished run (train and its AutoAttack) as a row, or None while it is not finished."
    d, a = RUNS/name, RUNS/f'{name}_aa'
    if not (d/'metrics.json').is_file() or not (a/'metrics.json').is_file(): return None
    m, aa = json.loads((d/'metrics.json').read_text()), json.loads((a/'metrics.json').read_text())
    cfg, nums = m['extra']['config'], _student(m)
    aa_nums = next(iter(aa['models'].values()))['numbers']
    aa_model = Path((aa['extra'].get('config') or {}).get('model', ''))
    if aa_model.parent.name != d.name:   # setting 2: `eval --n 1000 --seed 0` (its own subset), so only the file is checked
        raise ValueError(f"{name}: its AutoAttack run evaluated {aa_model}, not this run's weights.")
    if same_images and abs(aa_nums['clean'] - nums['clean']) > 1e-9:
        raise ValueError(f"{name}: the AutoAttack run's clean accuracy {aa_nums['clean']} is not the training run's "
                         f"{nums['clean']}: it evaluated another checkpoint.")
    return dict(name=name, method=cfg['method'], igdm=bool(cfg['igdm']), igdm_bn=cfg.get('igdm_bn'), seed=cfg['seed'],
                clean=nums['clean'], fgsm=nums['fgsm'], pgd20=nums['pgd20'], cw=nums['cw'], aa=aa_nums['aa'],
                gd=nums.get('gd'), gc=nums.get('gc'), seconds=m['extra']['seconds']['student'],
                aa_seconds=next(iter(aa['models'].values()))['seconds']['total'])

def _diff(a:list, b:list)->dict|None:
    "AA of `a` − AA of `b`, paired by seed over the seeds both have finished (None if none)."
    sa, sb = {r['seed']: r for r in a if r}, {r['seed']: r for r in b if r}
    seeds = sorted(set(sa) & set(sb))
    if not seeds: return None
    d = paired_diff([sa[s]['aa'] for s in seeds], [sb[s]['aa'] for s in seeds])
    return dict(mean=d['mean'], low=d['low'], high=d['high'], signs=dict(positive=d['positive'], negative=d['negative'],
                zero=d['zero']), seeds=seeds, diffs=d['diffs'])

def pilot()->dict:
    "The pilot's rows and the candidate its rule picks (None until every pilot run has finished)."
    rows = {v: [run_row(f'pilot/ard_igdm_{v}_s{s}') for s in PILOT_SEEDS] for v in ('update', *CANDIDATES)}
    rows['base'] = [run_row(f'pilot/ard_s{s}') for s in PILOT_SEEDS]
    done = all(all(rs) for rs in rows.values())
    d = {v: _diff(rows[v], rows['update']) for v in CANDIDATES}
    choice = None
    if done:
        best = max(d[v]['mean'] for v in CANDIDATES)
        choice = next(v for v in CANDIDATES if d[v]['mean'] >= best - TIE)   # the cheapest of the tied
    return dict(rows=rows, minus_update=d, minus_base={v: _diff(rows[v], rows['base']) for v in ('update', *CANDIDATES)},
                done=done, choice=choice)

MEANS = ('clean', 'pgd20', 'aa', 'gd', 'gc', 'seconds', 'aa_seconds')   # per-arm means beside the differences (GD, GC and compute as they come out)

def _means(rows:list)->dict:
    "The mean of each of MEANS over the finished seeds of one arm, and their count."
    done = [r for r in rows if r]
    out = {k: (sum(r[k] for r in done) / len(done) if done and all(r[k] is not None for r in done) else None) for k in MEANS}
    return dict(out, n=len(done))

def _arms(folder:str, prefix:str, tags:dict, seeds, same_images:bool=True)->dict:
    "Each arm's rows: tag name -> [run_row of `folder/prefix+tag_sSEED` for each seed]."
    return {k: [run_row(f"{folder}/{prefix}{t}_s{s}", same_images) for s in seeds] for k, t in tags.items()}

def setting(name:str, variant:str)->dict:
    "One setting's differences per method (VARIANT − update, VARIANT − base), the reported-only rows, arm means, completeness."
    cfg = all_settings()[name]
    methods, complete, arms = {}, True, {}
    for m in cfg['methods']:
        a = _arms(cfg['folder'], m, dict(base='', update='_igdm_update', variant=f'_igdm_{variant}'), cfg['seeds'], cfg.get('same_images', True))
        complete &= all(all(rs) for rs in a.values())
        methods[m] = dict(variant_minus_update=_diff(a['variant'], a['update']), variant_minus_base=_diff(a['variant'], a['base']),
                          update_minus_base=_diff(a['update'], a['base']))
        arms[m] = {k: _means(rs) for k, rs in a.items()}
    extra = {}
    for label, (prefix, vt, ut, bt) in cfg.get('extra', {}).items():
        a = _arms(cfg['folder'], prefix, dict(base=bt, update=ut, variant=vt.format(v=variant)), cfg['seeds'], cfg.get('same_images', True))
        extra[label] = dict(variant_minus_update=_diff(a['variant'], a['update']), variant_minus_base=_diff(a['variant'], a['base']),
                            update_minus_base=_diff(a['update'], a['base']))
        arms[label] = {k: _means(rs) for k, rs in a.items()}
    return dict(name=name, data=cfg['data'], eps=cfg['eps'], seeds=list(cfg['seeds']), complete=complete, methods=methods,
                extra=extra, arms=arms)

def decide(settings:list, variant:str|None, blocked:str|None=None)->tuple[str, str]:
    "The default the rule gives, and why (`blocked`: why a setting cannot be run, which leaves the default 'update')."
    if variant is None: return 'update', "the pilot has not finished: no VARIANT yet"
    if blocked: return 'update', blocked
    missing = [s['name'] for s in settings if not s['complete']] + [n for n in ('second setting',) if len(settings) < 2]
    if missing: return 'update', f"not every setting has all its seeds ({', '.join(missing)}): the rule is not applied yet"
    d = [[m['variant_minus_update'] for m in s['methods'].values()] for s in settings]
    non_inferior = all(x['mean'] > NON_INFERIOR for s in d for x in s)
    superior = any(all(x['low'] > 0 for x in s) for s in d)
    if non_inferior and superior: return variant, "both conditions hold"
    return 'update', f"non-inferiority {'holds' if non_inferior else 'fails'}, superiority {'holds' if superior else 'fails'}"

def _fmt(d:dict|None)->str:
    if d is None: return '–'
    iv = '' if d['low'] is None else f" [{d['low']:+.2f}, {d['high']:+.2f}]"
    return f"{d['mean']:+.2f}{iv} ({d['signs']['positive']}+/{d['signs']['negative']}-, n={len(d['seeds'])})"

def markdown(p:dict, settings:list, default:str, why:str)->str:
    md = "# Issue #26: results (written by decide.py from the run folders)\n\n## Pilot (ARD, α = 5, seeds 100 and 101)\n\n"
    md += "| run | clean | PGD-20 | AA | GD | GC | train s | AA s | AA − update | AA − base |\n|---|---|---|---|---|---|---|---|---|---|\n"
    for v in ('base', 'update', *CANDIDATES):
        for r in p['rows'][v]:
            if r is None: continue
            md += (f"| {r['name']} | {r['clean']:.2f} | {r['pgd20']:.2f} | {r['aa']:.2f} | "
                   f"{'–' if r['gd'] is None else format(r['gd'], '.4f')} | {'–' if r['gc'] is None else format(r['gc'], '.4f')} | "
                   f"{r['seconds']:.0f} | {r['aa_seconds']:.0f} | | |\n")
        if v in CANDIDATES or v == 'update':
            md += f"| **{v}, paired** | | | | | | | | {_fmt(p['minus_update'].get(v))} | {_fmt(p['minus_base'].get(v))} |\n"
    md += f"\nPilot rule (README.md): {'chosen: **' + p['choice'] + '**' if p['done'] else 'not every pilot run has finished'}.\n"
    for s in settings:
        md += f"\n## Setting {s['name']} ({s['data']}, {s['eps']}; seeds {s['seeds']}; {'complete' if s['complete'] else 'incomplete'})\n\n"
        md += "| method | VARIANT − update | VARIANT − base | update − base |\n|---|---|---|---|\n"
        for m, x in s['methods'].items():
            md += f"| {m} | {_fmt(x['variant_minus_update'])} | {_fmt(x['variant_minus_base'])} | {_fmt(x['update_minus_base'])} |\n"
        for m, x in s.get('extra', {}).items():   # reported, not part of the rule
            md += f"| {m} (reported only) | {_fmt(x['variant_minus_update'])} | {_fmt(x['variant_minus_base'])} | {_fmt(x['update_minus_base'])} |\n"
        if s.get('extra'): md += "\nThe α rows pair ARD + IGDM VARIANT at that α with ARD + IGDM `update` at α = 5 and with the ARD base.\n"
        md += ("\nMeans over the finished seeds (GD: gradient distance, GC: gradient cosine with the teacher, as `train` measures them; "
               "compute per run: the wall seconds of training and of its AutoAttack, each one process with one torch thread, on a machine "
               "shared with a second lane; a run resumed from a checkpoint counts its last invocation only):\n\n")
        md += "| runs | arm | n | clean | PGD-20 | AA | GD | GC | train s | AA s |\n|---|---|---|---|---|---|---|---|---|---|\n"
        f = lambda v, p: '–' if v is None else format(v, p)
        for m, arms in s.get('arms', {}).items():
            for k, a in arms.items():
                if a['n']: md += (f"| {m} | {k} | {a['n']} | {f(a['clean'], '.2f')} | {f(a['pgd20'], '.2f')} | {f(a['aa'], '.2f')} | "
                                  f"{f(a['gd'], '.4f')} | {f(a['gc'], '.4f')} | {f(a['seconds'], '.0f')} | {f(a['aa_seconds'], '.0f')} |\n")
    md += f"\n## Decision\n\n{RULE}\n\nDefault: **{default}** ({why}).\n"
    return md

def main():
    p = pilot()
    variant = p['choice']
    _, blocked = setting2()
    settings = [setting(n, variant) for n in all_settings()] if variant else []
    default, why = decide(settings, variant, blocked)
    out = dict(rule=RULE, commit=COMMIT, pilot=dict(done=p['done'], choice=variant, minus_update=p['minus_update'],
               minus_base=p['minus_base']), settings=settings, variant=variant, default=default, why=why)
    atomic_write(HERE/'decision.json', lambda f: f.write((json.dumps(out, indent=1) + '\n').encode()))
    atomic_write(HERE/'results.md', lambda f: f.write(markdown(p, settings, default, why).encode()))
    print(f"pilot: {'chosen ' + variant if variant else 'not finished'}; default igdm_bn: {default} ({why})")

if __name__ == '__main__': main()
