"""Step efficiency: igdmfast's full training step (a `distill_learner` fit) against the sum of the passes the math
cannot avoid, each timed alone in plain PyTorch on the same models and batch (DESIGN.md "Where the cost is"):

- inner maximization: K forwards of the student in eval mode with frozen parameters, each with its input backward
  (AdaAD: of the student and the teacher);
- teacher forwards under `no_grad`: T(x) (RSLAD, before the attack) and one batched call on [x′, x−δ];
- student forwards in train mode: S(x′) (= S(x+δ)), S(x) (RSLAD), S(x−δ);
- one backward, and the optimizer's update.

Everything else (the losses on the logits, the attack's sign and projection steps, fastai's callbacks and data
loader) is overhead. efficiency = sum of the passes / full step (1.0: no overhead at all). The passes run the
modules the step runs: igdmfast's default step (`fold_bn=True`) against passes through the conv→BN-folded views
(`bn_folded`) of the eval-mode student and teacher, and the `fold_bn=False` step against passes through the plain
modules.

    python bench/bench_efficiency.py [--device cuda] [--methods rslad,adaad] [--batches 2] [--repeats 5]
"""
from __future__ import annotations
import copy, os, time
import torch
import torch.nn.functional as F
from _common import base_parser, setup, describe, models, images, machine, interleaved, med, table, dump, sync
from bench_step import learner, fit
import reference


def pass_timer(method, teacher, student, x, y, args, dev, fold, n_steps=10):
    "A callable that runs every unavoidable pass of `args.batches` steps once, adding each pass's time to `acc`."
    from igdmfast.core import frozen
    from igdmfast.callback.adversarial import bn_folded
    T = copy.deepcopy(teacher).to(dev).eval().requires_grad_(False)
    S = copy.deepcopy(student).to(dev)
    Te, Se = (bn_folded(T), bn_folded(S)) if fold else (T, S)   # what eval-mode forwards run
    opt = torch.optim.SGD(S.parameters(), lr=0.1, momentum=0.9, weight_decay=reference.WEIGHT_DECAY[method])
    batches = [(x[i:i+args.bs].to(dev), y[i:i+args.bs].to(dev)) for i in range(0, len(x), args.bs)]
    acc = {}

    def timed(name, f):
        sync(dev); t0 = time.perf_counter()
        out = f()
        sync(dev); acc[name] = acc.get(name, 0.) + time.perf_counter() - t0
        return out

    def run():
        for xb, _ in batches:
            x_adv = (xb + 8/255 * (2 * torch.rand_like(xb) - 1)).clamp(0, 1)   # any point of the ball: the cost is the same
            x_minus = xb - (x_adv - xb)
            if method == 'rslad':
                with torch.no_grad(): t_nat = timed('teacher forwards', lambda: Te(xb))
            S.eval()
            with frozen(S):
                for _ in range(n_steps):
                    def step():
                        z = x_adv.detach().requires_grad_(True)
                        if method == 'adaad': out = (Se(z).log_softmax(1) * Te(z).softmax(1)).sum()
                        else: out = (Se(z).log_softmax(1) * t_nat.softmax(1)).sum()
                        return torch.autograd.grad(out, z)[0]
                    timed('inner maximization', step)
            S.train()
            with torch.no_grad(): t_out = timed('teacher forwards', lambda: Te(torch.cat([x_adv, x_minus])))
            outs = [timed('student forwards', lambda v=v: S(v)) for v in ([x_adv, xb, x_minus] if method == 'rslad' else [x_adv, x_minus])]
            loss = sum(F.cross_entropy(o, t_out[:len(xb)].argmax(1)) for o in outs)   # any loss through every forward
            timed('backward', loss.backward)
            timed('optimizer step', opt.step)
            opt.zero_grad()
    return run, acc


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument('--methods', default='rslad,adaad')
    p.add_argument('--batches', type=int, default=2, help='training steps per timed run (one fit on the igdmfast side)')
    args = p.parse_args(argv)
    dev = setup(args)
    teacher, student = models(args.classes, args.seed)
    x, y = images(args.bs * args.batches, args.classes, args.seed)
    info = machine(dev)
    print(f"bench_efficiency: igdmfast step vs the sum of its unavoidable passes | batch {args.bs}, {args.classes} classes, "
          f"PGD-10, {args.batches} steps per run, median of {args.repeats} interleaved runs after 1 warm-up\n  {describe(info)}")
    rows, details = [], {}
    for m in args.methods.split(','):
        steps, passes, accs = {}, {}, {}
        for fold in (True, False):
            learn = learner(copy.deepcopy(teacher), copy.deepcopy(student), x, y, m, args, dev, fold_bn=fold)
            run_passes, acc = pass_timer(m, teacher, student, x, y, args, dev, fold)
            totals = accs[fold] = []
            def once(run_passes=run_passes, acc=acc, totals=totals): acc.clear(); run_passes(); totals.append(dict(acc))
            steps[f"step fold_bn={fold}"], passes[f"passes fold_bn={fold}"] = (lambda l=learn: fit(l)), once
        wall, cpu = interleaved({**steps, **passes}, args.repeats, dev)
        for fold in (True, False):
            totals = accs[fold][1:]   # the warm-up run dropped
            per = {k: med([t[k] for t in totals]) / args.batches for k in totals[-1]}
            step_s, pass_s = med(wall[f"step fold_bn={fold}"]) / args.batches, med([sum(t.values()) for t in totals]) / args.batches
            row = dict(method=f"{m}+igdm", fold_bn=fold, **{f"{k} s": v for k, v in per.items()},
                       **{'sum of passes s': pass_s, 'full step s': step_s, 'efficiency': pass_s / step_s})
            if dev.type == 'cpu':   # the passes' script against the step, in process CPU time (one thread: the steadier measure)
                row['efficiency (cpu-s)'] = med(cpu[f"passes fold_bn={fold}"]) / med(cpu[f"step fold_bn={fold}"])
            row['load'] = round(os.getloadavg()[0], 2)
            rows.append(row)
        details[m] = dict(wall=wall, cpu=cpu, passes={str(k): v for k, v in accs.items()})
    keys = [k for k in rows[0] if k.endswith(' s') and k not in ('sum of passes s', 'full step s')]
    cols = ['method', 'fold_bn'] + keys + ['sum of passes s', 'full step s', 'efficiency'] + \
           (['efficiency (cpu-s)'] if dev.type == 'cpu' else []) + ['load']
    print(table(rows, cols))
    info['loadavg_end'] = [round(v, 2) for v in os.getloadavg()]
    dump(args, dict(machine=info, args=vars(args), rows=rows, details=details))


if __name__ == '__main__': main()
