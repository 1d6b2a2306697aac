"experiments/ranking: the criterion's order against the ARD students' AutoAttack (results.md, results.json), from the run folders."
import itertools, json, random
from pathlib import Path
from scipy.stats import spearmanr

HERE = Path(__file__).parent
TEACHERS = ['pgd_at_w16', 'trades_w16', 'pgd_at_w64', 'trades_w64']
SEEDS = [0, 1]

def load(p): return json.loads(Path(p).read_text())

def rho(x, y): return float(spearmanr(x, y).statistic)

def student(t, s):
    "The student's numbers: clean/PGD-20 of `train` (all 360 images) and AutoAttack on the seeded 200 (`eval`), with its count."
    d = HERE/'students'/f'{t}_s{s}'
    if not (d/'aa'/'metrics.json').is_file(): return None
    row = next(v for k, v in load(d/'metrics.json')['models'].items() if k.startswith('student'))['numbers']
    a = next(iter(load(d/'aa'/'metrics.json')['models'].values()))
    return dict(clean=row['clean'], pgd20=row['pgd20'], aa=a['accuracy']['aa'], aa_correct=a['correct']['aa'], n_aa=a['n'])

def main():
    rank = load(HERE/'rank'/'ranking.json')
    by = {Path(r['teacher']).parent.name: r for r in rank['rows']}
    st = {(t, s): student(t, s) for t in TEACHERS for s in SEEDS}
    done = [t for t in TEACHERS if all(st[t, s] is not None for s in SEEDS)]
    out = dict(ranking_order=[Path(t).parent.name for t in rank['order']], n_unlearnable=rank['n_unlearnable'], n_train=rank['n_train'],
               teachers={t: dict(entropy=by[t]['entropy'], entropy_all=by[t]['entropy_all'], clean=by[t]['clean'], pgd20=by[t]['robust'],
                                 students={s: st[t, s] and st[t, s] for s in SEEDS})
                         for t in TEACHERS}, finished=done)
    lines = ['# experiments/ranking: results', '',
             f"Unlearnable set: {rank['n_unlearnable']} of {rank['n_train']} training images "
             f"({', '.join(rank['references'])}). Predicted order: {' > '.join(out['ranking_order'])}.", '',
             '| teacher | entropy (unlearnable) | entropy (all) | teacher clean | teacher PGD-20 | student AA seed 0 | seed 1 | mean | student PGD-20 mean |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for t in TEACHERS:
        r, ss = by[t], [st[t, s] for s in SEEDS]
        aas = [f"{x['aa']:.1f}" if x else '—' for x in ss]
        mean = f"{sum(x['aa'] for x in ss) / len(ss):.2f}" if all(ss) else '—'
        pgd = f"{sum(x['pgd20'] for x in ss) / len(ss):.2f}" if all(ss) else '—'
        lines.append(f"| {t} | {r['entropy']:.4f} | {r['entropy_all']:.4f} | {r['clean']:.2f} | {r['robust']:.2f} | {' | '.join(aas)} | {mean} | {pgd} |")
    if len(done) >= 3:
        aa = [sum(st[t, s]['aa'] for s in SEEDS) / len(SEEDS) for t in done]
        preds = dict(criterion=[by[t]['entropy'] for t in done], entropy_all=[by[t]['entropy_all'] for t in done],
                     teacher_pgd20=[by[t]['robust'] for t in done], teacher_clean=[by[t]['clean'] for t in done])
        res = {}
        for name, x in preds.items():
            seeds_rho = [rho(x, [st[t, c]['aa'] for t, c in zip(done, choice)]) for choice in itertools.product(SEEDS, repeat=len(done))]
            perm = [rho(x, [aa[i] for i in p]) for p in itertools.permutations(range(len(done)))]
            obs = rho(x, aa)
            res[name] = dict(rho=obs, rho_over_seed_choices=dict(min=min(seeds_rho), max=max(seeds_rho), mean=sum(seeds_rho) / len(seeds_rho)),
                             p_one_sided=sum(v >= obs - 1e-12 for v in perm) / len(perm))
            # the test images' noise: each student's AutoAttack count redrawn as Binomial(n, its accuracy) (independently,
            # which ignores that all students are scored on the same 200 images), 1,000 times
            g, boot = random.Random(0), []
            for _ in range(1000):
                draw = lambda r: sum(g.random() < r['aa_correct'] / r['n_aa'] for _ in range(r['n_aa'])) / r['n_aa']
                boot.append(rho(x, [sum(draw(st[t, s]) for s in SEEDS) for t in done]))
            boot.sort()
            res[name]['rho_bootstrap_images_95'] = [boot[24], boot[974]]
        out['spearman'] = res
        lines += ['', f"Spearman ρ with the mean student AutoAttack over {len(done)} teachers ({', '.join(done)}):", '',
                  '| predictor | ρ | ρ over the 16 seed choices (min, mean, max) | 95% parametric bootstrap of the AutoAttack counts | exact one-sided p (permutations) |',
                  '|---|---:|---|---|---:|']
        for name, r in res.items():
            sc, bt = r['rho_over_seed_choices'], r.get('rho_bootstrap_images_95')
            lines.append(f"| {name} | {r['rho']:.2f} | {sc['min']:.2f}, {sc['mean']:.2f}, {sc['max']:.2f} | "
                         f"{'—' if bt is None else f'[{bt[0]:.2f}, {bt[1]:.2f}]'} | {r['p_one_sided']:.3f} |")
    (HERE/'results.json').write_text(json.dumps(out, indent=2))
    (HERE/'results.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))

if __name__ == '__main__': main()
