"""Evaluation throughput: igdmfast's `robust_eval` PGD-20 against a direct PGD-20 loop written the way the official
scripts' `attack_pgd` evaluation is, and igdmfast's AutoAttack adapter (`igdmfast.attacks.autoattack`) against a
direct call of the reference AutoAttack code (`pyautoattack`, keyword-only API), on the same model and samples.

The model is the benchmark's student (a small MobileNet-style CIFAR net) after a short clean training on CIFAR-shaped
synthetic images, so that it classifies most of them (AutoAttack only attacks what is still classified correctly).

    python bench/bench_eval.py [--device cuda] [--n 128] [--repeats 3] [--aa-version standard]
"""
from __future__ import annotations
import copy, os
import torch
import torch.nn.functional as F
from _common import base_parser, setup, describe, models, images, machine, interleaved, med, table, dump, sync


def trained_student(args, dev):
    "The student after `args.train_epochs` epochs of clean SGD on 1024 synthetic images (seeded)."
    _, s = models(args.classes, args.seed)
    s = s.to(dev)
    x, y = images(1024, args.classes, args.seed + 1)
    opt = torch.optim.SGD(s.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.train_epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(s(x[idx].to(dev)), y[idx].to(dev))
            opt.zero_grad(); loss.backward(); opt.step()
    return s.eval().requires_grad_(False)


def direct_pgd20(model, x, y, bs, dev, eps=8/255, step_size=2/255, steps=20, seed=0):
    "PGD-20 accuracy (%) the way the official scripts evaluate (`attack_pgd`), the start drawn as igdmfast draws it."
    model.eval()
    g = torch.Generator(device=dev).manual_seed(seed)
    correct = 0
    for i in range(0, len(x), bs):
        X, Y = x[i:i+bs].to(dev), y[i:i+bs].to(dev)
        with torch.no_grad(): model(X)   # the clean accuracy both scripts compute alongside
        x_adv = (X + ((2 * torch.rand(X.shape, generator=g, device=dev) - 1) * eps).clamp(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_()
            loss = F.cross_entropy(model(x_adv), Y)
            grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = x_adv.detach() + step_size * torch.sign(grad)
            x_adv = torch.clamp(torch.min(torch.max(x_adv, X - eps), X + eps), 0, 1)
        with torch.no_grad(): correct += int((model(x_adv).argmax(1) == Y).sum())
    return 100 * correct / len(x)


def main(argv=None):
    p = base_parser(__doc__, classes=10, repeats=3)
    p.add_argument('--n', type=int, default=128, help='evaluated samples')
    p.add_argument('--eval-bs', type=int, default=128, help='evaluation batch size')
    p.add_argument('--train-epochs', type=int, default=3)
    p.add_argument('--aa-version', default='standard', help="AutoAttack version ('standard', or 'custom' with --aa-attacks)")
    p.add_argument('--aa-attacks', default=None, help="for --aa-version custom, e.g. 'apgd-ce,apgd-t'")
    args = p.parse_args(argv)
    dev = setup(args)
    from igdmfast.evaluate import robust_eval
    from igdmfast.attacks import autoattack
    from pyautoattack import AutoAttack
    model = trained_student(args, dev)
    x, y = images(args.n, args.classes, args.seed + 2)
    xd, yd = x.to(dev), y.to(dev)
    aa_attacks = args.aa_attacks.split(',') if args.aa_attacks else None
    info = machine(dev)
    print(f"bench_eval: robust_eval / the AutoAttack adapter vs direct calls | {args.n} samples, batch {args.eval_bs}, "
          f"{args.classes} classes, AutoAttack {args.aa_version}{'' if not aa_attacks else ' ' + '+'.join(aa_attacks)}, "
          f"median of {args.repeats} interleaved runs after 1 warm-up\n  {describe(info)}")

    res = {}
    def lib_pgd(): res['lib_pgd'] = robust_eval(model, (x, y), attacks=['pgd20'], bs=args.eval_bs, progress=False, warn=False).accuracy['pgd20']
    def ref_pgd(): res['ref_pgd'] = direct_pgd20(model, x, y, args.eval_bs, dev)
    def lib_aa():
        _, robust = autoattack(model, xd, yd, 8/255, version=args.aa_version, attacks=aa_attacks, bs=args.eval_bs, seed=0)
        res['lib_aa'] = 100 * robust.float().mean().item()
    def ref_aa():
        aa = AutoAttack(model, attacks=aa_attacks, device=dev, eps=8/255, norm='Linf', seed=0, version=args.aa_version)
        _, y_adv = aa.run_standard_evaluation(xd, yd, batch_size=args.eval_bs)
        res['ref_aa'] = 100 * (y_adv == yd).float().mean().item()
    with torch.no_grad(): clean = 100 * (model(xd).argmax(1) == yd).float().mean().item()

    rows = []
    for name, sides in (('PGD-20', dict(igdmfast=lib_pgd, direct=ref_pgd)), ('AutoAttack', dict(igdmfast=lib_aa, direct=ref_aa))):
        wall, cpu = interleaved(sides, args.repeats, dev)
        key = 'pgd' if name == 'PGD-20' else 'aa'
        row = dict(attack=name, **{f"{k} img/s": args.n / med(v) for k, v in wall.items()})
        row['ratio'] = row['igdmfast img/s'] / row['direct img/s']
        if dev.type == 'cpu':
            row.update({f"{k} img/cpu-s": args.n / med(v) for k, v in cpu.items()})
            row['ratio (cpu-s)'] = row['igdmfast img/cpu-s'] / row['direct img/cpu-s']
        row.update({'igdmfast acc %': res[f'lib_{key}'], 'direct acc %': res[f'ref_{key}'], 'load': round(os.getloadavg()[0], 2)})
        row['wall_s'] = wall; row['cpu_s'] = cpu
        rows.append(row)
    print(f"clean accuracy of the model on these samples: {clean:.1f}%")
    cols = ['attack', 'igdmfast img/s', 'direct img/s', 'ratio'] + \
           (['igdmfast img/cpu-s', 'direct img/cpu-s', 'ratio (cpu-s)'] if dev.type == 'cpu' else []) + \
           ['igdmfast acc %', 'direct acc %', 'load']
    print(table(rows, cols))
    info['loadavg_end'] = [round(v, 2) for v in os.getloadavg()]
    dump(args, dict(machine=info, args=vars(args), clean=clean, rows=rows))


if __name__ == '__main__': main()
