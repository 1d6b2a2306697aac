"""igdmfast's training step (a real `distill_learner` fit) against the official IGDM scripts' step (bench/reference.py),
for RSLAD+IGDM and AdaAD+IGDM on the same models, batches and seed: first both must give the same loss and the same
parameter gradients (fp32), then both are timed, interleaved, and their peak memory is measured in fresh processes.

    python bench/bench_step.py [--device cuda] [--methods rslad,adaad] [--batches 2] [--repeats 5] [--threads 1]
                               [--teacher-free]

`--teacher-free` adds a side to the timing: igdmfast with `inner='student_ce'`, the method's outer loss and IGDM on a
perturbation from PGD-CE on the student alone (the paper's Table 6 "w/o teacher in inner max"). It computes another
step than the scripts', so it is timed, not compared; its `vs igdmfast` column is its speed against igdmfast's default.
"""
from __future__ import annotations
import copy, json, os, sys
import torch
from _common import (PAIRS, base_parser, setup, describe, models, images, machine, interleaved, med, peak_memory, child_memory, table,
                     dump, sync, _drop_json)
import reference

ALPHA = dict(rslad=4.0, adaad=50.0)   # the paper's α for MobileNetV2 / CIFAR-100 / BDM-AT teacher (spec a.3)
EPOCHS = 1                              # one fit of one epoch: igdmfast's ramp α·(e+1)/E and the script's α·e/E both give α


def learner(teacher, student, x, y, method, args, dev, dtype=torch.float32, **opts):
    "igdmfast's `distill_learner` over the batches `x, y` (in order), the paper protocol, no validation, no bar, no logs."
    from fastai.callback.core import Callback, CancelValidException
    from igdmfast.core import ThreatModel
    from igdmfast.data import tensor_dls
    from igdmfast.learner import distill_learner

    class NoValidation(Callback):
        def before_validate(self): raise CancelValidException()

    dls = tensor_dls(x, y, x[:1], y[:1], bs=args.bs, device=dev, shuffle=False, class_names=[str(i) for i in range(args.classes)])
    if dtype != torch.float32:   # the loaders give float32 images
        for dl in dls.loaders: dl.batch_tfm = lambda b: (b[0].to(dtype), b[1])
    learn = distill_learner(teacher, student, dls, method=method, igdm=True, alpha=ALPHA[method], threat=ThreatModel(),
                            protocol='paper', wd=reference.WEIGHT_DECAY[method], check_teacher=False,
                            cbs=[NoValidation()], **opts)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ in ('ProgressCallback',)])
    return learn


def fit(learn):
    with learn.no_logging(): learn.fit(EPOCHS)


def ref_setup(teacher, student, method, dev):
    return reference.make(copy.deepcopy(student), copy.deepcopy(teacher), method, dev)


def ref_run(method, s, t, opt, batches, args, step=True, **kw):
    f = reference.STEPS[method]
    return [f(s, t, opt, xb, yb, ALPHA[method], EPOCHS, EPOCHS, n_classes=args.classes, step=step, **kw) for xb, yb in batches]


def lib_once(method, teacher, student, xb, yb, args, dev, dtype, seed, **opts):
    "One igdmfast step (a `fit` of one batch) in `dtype`: its loss, parameter gradients and x′."
    from fastai.callback.core import Callback
    from igdmfast.callback.adversarial import AdvExamples
    got = {}

    class Probe(Callback):
        order = AdvExamples.order - 1
        def before_batch(self):
            if self.training: torch.manual_seed(seed)
        def after_backward(self):
            got.update(loss=self.learn.loss_grad.detach().clone(), x_adv=self.xb[0].detach().clone(),
                       grads={n: p.grad.detach().clone() for n, p in self.model.named_parameters()})
        def after_batch(self):   # fastai's smoothed loss is a float32 buffer
            if self.training: self.learn.loss = self.learn.loss.float()

    t, m = copy.deepcopy(teacher), copy.deepcopy(student)
    learn = learner(t, m, xb, yb, method, args, dev, dtype, **opts)
    t.to(dtype); m.to(dtype)   # after `distill_learner`'s float32 probe of the models
    learn.add_cb(Probe())
    fit(learn)
    return got


def ref_once(method, teacher, student, xb, yb, args, dev, dtype, seed, **kw):
    "One reference step in `dtype`: its loss, parameter gradients and x′."
    s, t, opt = ref_setup(copy.deepcopy(teacher).to(dtype), copy.deepcopy(student).to(dtype), method, dev)
    torch.manual_seed(seed)   # the noise igdmfast draws from the same seed (in the batch's dtype), passed to the script's step
    noise = torch.randn(xb.shape, device=dev, dtype=dtype)
    loss, x_adv = ref_run(method, s, t, opt, [(xb.to(dev, dtype), yb.to(dev))], args, step=False, noise=noise, **kw)[0]
    return dict(loss=loss, x_adv=x_adv, grads={n: p.grad.detach().clone() for n, p in s.module.named_parameters()})


def errors(a, b)->dict:
    "How far step `a` is from step `b`: relative loss error, gradient error (max |Δ| over all / max |g| over all), x′ entries that differ."
    gmax = max(g.abs().max().item() for g in b['grads'].values())
    return dict(loss=abs(a['loss'].item() - b['loss'].item()) / abs(b['loss'].item()),
                grad=max((a['grads'][n].double() - g.double()).abs().max().item() for n, g in b['grads'].items()) / gmax,
                x_adv=int(((a['x_adv'].double() - b['x_adv'].double()).abs() > 1e-6).sum()))


SIDES = {'igdmfast': dict(channels_last=False, attack_dtype='fp32'), 'igdmfast fold_bn=False': dict(fold_bn=False, channels_last=False, attack_dtype='fp32'),
         'reference': None}
LAYOUTS = {'igdmfast NHWC': dict(channels_last=True, attack_dtype='fp32'),       # timed beside 'auto' (issue #28), not compared
           'igdmfast NCHW bf16': dict(channels_last=False, attack_dtype='bf16'),  # (the bf16 sides only where bf16 is native)
           'igdmfast NHWC bf16': dict(channels_last=True, attack_dtype='bf16'),
           'igdmfast auto': dict(channels_last='auto', attack_dtype='auto')}
EPOCH_STEPS = 391   # one CIFAR epoch at batch 128: the fit the 'auto' side's probe is amortised over in its 'incl. probe' row
TEACHER_FREE = {'igdmfast inner=student_ce': dict(inner='student_ce')}   # timed with --teacher-free, not compared


def side_opts(side):
    "The `distill_learner` options of a side (None: the reference)."
    return TEACHER_FREE[side] if side in TEACHER_FREE else LAYOUTS[side] if side in LAYOUTS else SIDES[side]


PROBES = {}   # method -> the 'auto' side's AutoSpeed record (its first fit, in the warm-up round, probes)


def check_same(method, teacher, student, x, y, args, dev, seed=1234)->dict:
    """igdmfast (with and without `fold_bn`) against the reference from the same weights, batch and seed: in float64
    (the math: must agree) and in float32, with the float32 noise floor: the reference against itself when x+δ is the
    bit pattern of x′ rather than x + (x′ − x) (the same point; IGDM's output differences S(x+δ) − S(x−δ) amplify
    such last-bit changes)."""
    xb, yb = x[:args.bs], y[:args.bs]
    out = {}
    for dt in (torch.float64, torch.float32):
        r = ref_once(method, teacher, student, xb, yb, args, dev, dt, seed)
        for side, opts in SIDES.items():
            if opts is not None: out[(side, str(dt)[6:])] = errors(lib_once(method, teacher, student, xb, yb, args, dev, dt, seed, **opts), r)
        if dt == torch.float32:
            out[('reference x+δ as x′', 'float32')] = errors(ref_once(method, teacher, student, xb, yb, args, dev, dt, seed, plus_at_x_adv=True), r)
    return out


def run_side(side, method, teacher, student, x, y, args, dev):
    "A callable that runs `args.batches` training steps on `side` (set up once, outside the timing)."
    if side_opts(side) is not None:
        learn = learner(copy.deepcopy(teacher), copy.deepcopy(student), x, y, method, args, dev, **side_opts(side))
        if hasattr(learn, 'auto_speed'): learn.auto_speed.min_steps, learn.auto_speed.cache = 0, False   # probe at the first fit (warm-up)
        def run():
            fit(learn)
            if hasattr(learn, 'auto_speed'): PROBES.setdefault(method, learn.auto_speed.record)
            # the bf16 soundness check runs at each fit's first batch: once per real fit, so here only in the warm-up round
            learn.adv_examples.check_precision = False
        return run
    s, t, opt = ref_setup(teacher, student, method, dev)
    batches = [(x[i:i+args.bs].to(dev), y[i:i+args.bs].to(dev)) for i in range(0, len(x), args.bs)]
    return lambda: ref_run(method, s, t, opt, batches, args)


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument('--methods', default='rslad,adaad')
    p.add_argument('--batches', type=int, default=2, help='training steps per timed run (one fit on the igdmfast side)')
    p.add_argument('--tol', type=float, default=1e-5, help='relative tolerance of the float64 loss and gradient check')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory processes')
    p.add_argument('--teacher-free', action='store_true', help="also time igdmfast with inner='student_ce' (Table 6)")
    p.add_argument('--pair', default='bench', help="the model pair of _common.PAIRS: bench, resnet18 or digits")
    p.add_argument('--no-auto', action='store_true', help="leave out the layout/precision sides and 'auto' (issue #28)")
    p.add_argument('--mem-child', default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    dev = setup(args)
    teacher, student = models(args.classes, args.seed, args.pair)
    x, y = images(args.bs * args.batches, args.classes, args.seed, args.pair)
    methods = args.methods.split(',')

    if args.mem_child:   # a fresh process: only one side, only its peak
        run = run_side(args.mem_child, methods[0], teacher, student, x, y, args, dev)
        print(json.dumps(dict(peak_mib=peak_memory(run, dev))))
        return

    info = machine(dev)
    print(f"bench_step: igdmfast distill_learner step vs the official scripts' step | pair {args.pair} {PAIRS[args.pair][:2]} | batch {args.bs}, {args.classes} classes, "
          f"PGD-10, {args.batches} steps per run, median of {args.repeats} interleaved runs after 1 warm-up\n  {describe(info)}")
    rows, checks = [], {}
    for m in methods:
        c = checks[m] = check_same(m, teacher, student, x, y, args, dev)
        for (side, dt), e in c.items():
            ok = e['loss'] <= args.tol and e['grad'] <= args.tol and e['x_adv'] == 0
            print(f"  {m}+igdm {dt}: {side} vs reference: loss {e['loss']:.1e}, grads {e['grad']:.1e}, x′ entries "
                  f"{e['x_adv']}" + (f" -> {'SAME' if ok else 'DIFFERENT'}" if dt == 'float64' else ''))
            if dt == 'float64' and not ok:
                raise SystemExit(f"{m}: {side} and the reference disagree beyond {args.tol:g} in float64; not timing them.")
    from igdmfast.precision import native_bf16
    layouts = [] if args.no_auto else [k for k in LAYOUTS if 'bf16' not in k or native_bf16(dev)]
    names = [*SIDES, *(TEACHER_FREE if args.teacher_free else ()), *layouts]
    for m in methods:
        sides = {k: run_side(k, m, teacher, student, x, y, args, dev) for k in names}
        wall, cpu = interleaved(sides, args.repeats, dev)
        n = args.bs * args.batches
        base = _strip_opt(_drop_json(sys.argv[1:] if argv is None else argv), '--methods') + ['--methods', m]
        for k in names:
            row = {'method': f"{m}+igdm", 'side': k, 'img/s': n / med(wall[k]), 'speed-up': med(wall['reference']) / med(wall[k])}
            if args.teacher_free: row['vs igdmfast'] = med(wall['igdmfast']) / med(wall[k])
            if dev.type == 'cpu':
                row.update({'img/cpu-s': n / med(cpu[k]), 'speed-up (cpu-s)': med(cpu['reference']) / med(cpu[k])})
                if args.teacher_free: row['vs igdmfast (cpu-s)'] = med(cpu['igdmfast']) / med(cpu[k])
            if not args.no_memory: row['peak MiB'] = child_memory(__file__, base, k)
            row.update(load=round(os.getloadavg()[0], 2), wall_s=[round(v, 3) for v in wall[k]], cpu_s=[round(v, 3) for v in cpu[k]])
            rows.append(row)
            if k == 'igdmfast auto':   # the probe paid once per fit: amortised over one CIFAR epoch of EPOCH_STEPS steps
                rec = PROBES[m]
                per = lambda t: t / args.batches + rec['probe_s'] / EPOCH_STEPS
                inc = {'method': f"{m}+igdm", 'side': f"auto incl. probe /{EPOCH_STEPS}", 'img/s': args.bs / per(med(wall[k])),
                       'speed-up': med(wall['reference']) / args.batches / per(med(wall[k])), 'load': row['load'],
                       'choice': rec['choice'], 'probe_s': rec['probe_s'], 'step_s': rec.get('step_s')}
                if dev.type == 'cpu': inc.update({'img/cpu-s': args.bs / per(med(cpu[k])), 'speed-up (cpu-s)': med(cpu['reference']) / args.batches / per(med(cpu[k]))})
                rows.append(inc)
                print(f"  {m}+igdm auto: {rec['choice']} (probe {rec['probe_s']:.2f} s; estimated steps {rec.get('step_s')})")
    for r in rows:   # every side against igdmfast's fixed NCHW fp32 (today's default on the CPU)
        r['vs NCHW fp32'] = r['img/s'] / next(q['img/s'] for q in rows if q['method'] == r['method'] and q['side'] == 'igdmfast')
        if dev.type == 'cpu': r['vs NCHW fp32 (cpu-s)'] = r['img/cpu-s'] / next(q['img/cpu-s'] for q in rows if q['method'] == r['method'] and q['side'] == 'igdmfast')
    cols = ['method', 'side', 'img/s', 'speed-up'] + (['vs igdmfast'] if args.teacher_free else []) + \
           (['img/cpu-s', 'speed-up (cpu-s)'] + (['vs igdmfast (cpu-s)'] if args.teacher_free else []) if dev.type == 'cpu' else []) + \
           ([] if args.no_memory else ['peak MiB']) + ['vs NCHW fp32'] + (['vs NCHW fp32 (cpu-s)'] if dev.type == 'cpu' else []) + ['load']
    print(table(rows, cols))
    info['loadavg_end'] = [round(v, 2) for v in os.getloadavg()]
    dump(args, dict(machine=info, args=vars(args), checks={m: {f"{k[0]} {k[1]}": v for k, v in c.items()} for m, c in checks.items()},
                    rows=rows))


def _strip_opt(argv, name):
    out, skip = [], False
    for a in argv:
        if skip: skip = False; continue
        if a == name: skip = True; continue
        if a.startswith(name + '='): continue
        out.append(a)
    return out


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == '__main__': main()
