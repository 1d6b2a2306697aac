"""One command for a lent GPU (issue #17): the training step of RSLAD+IGDM and AdaAD+IGDM (resnet18_cifar student,
wrn34_10 teacher, batch 128, 100 classes, PGD-10) against bench/reference.py (the official scripts' step) for each speed
option (fp32, bf16 outer only, bf16 attack, channels-last, compile), the attack-precision soundness check, robust_eval's
PGD-20 and the AutoAttack adapter against direct calls, and peak memory. Writes one Markdown and one JSON report.

    python bench/gpu_check.py --out bench/results/gpu_check            # on a GPU: under 8 minutes
    python bench/gpu_check.py --tiny --device cpu --out /tmp/gpu_check  # tiny models, a few images, 1 step: checks it runs

Nothing here asserts a time; the report says which precision and which option each number used.
"""
from __future__ import annotations
import argparse, copy, inspect, json, os, platform, resource, sys, time
from pathlib import Path
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
for p in (str(BENCH), str(BENCH.parent)):
    if p not in sys.path: sys.path.insert(0, p)
from _common import interleaved, med, table, sync, images   # noqa: E402
import reference   # noqa: E402

ALPHA = dict(rslad=4.0, adaad=50.0)   # the paper's α for MobileNetV2 / CIFAR-100 (as bench_step.py)
SIZES = {
    'full': dict(student='resnet18_cifar', teacher='wrn34_10', s_kw={}, t_kw={}, bs=128, classes=100, pgd=10, batches=2,
                 repeats=2, n_eval=256, eval_bs=128, train_epochs=3, n_train=2048, aa_version='standard', aa_attacks=None),
    # tiny: a width-8 student, not 4: torch 2.14.1's CPU backward of the width-4 tiny_resnet_cifar stored channels-last
    # corrupts the heap ("double free or corruption") on an AVX2-only AMD EPYC (width 8 runs; AVX-512 machines run both)
    'tiny': dict(student='tiny_resnet_cifar', teacher='tiny_resnet_cifar', s_kw=dict(width=8), t_kw=dict(width=8), bs=8,
                 classes=10, pgd=2, batches=1, repeats=1, n_eval=16, eval_bs=16, train_epochs=1, n_train=64,
                 aa_version='custom', aa_attacks=('apgd-ce',)),
    # the CPU benchmarks' pair (bench/_common.py: tiny_resnet_cifar teacher, tiny_mobilenet_cifar student), full batch
    'bench': dict(student='tiny_mobilenet_cifar', teacher='tiny_resnet_cifar', s_kw={}, t_kw={}, bs=128, classes=100, pgd=10,
                  batches=2, repeats=3, n_eval=128, eval_bs=128, train_epochs=3, n_train=1024, aa_version='custom',
                  aa_attacks=('apgd-ce', 'apgd-t')),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=str(BENCH / 'results' / 'gpu_check'), help='folder of gpu_check.md and gpu_check.json')
    p.add_argument('--device', default=None, help="'cuda' (default when available) or 'cpu'")
    p.add_argument('--tiny', action='store_true', help='tiny models, a few images, one step: a check that the script runs')
    p.add_argument('--size', default=None, choices=sorted(SIZES),
                   help="'full' (default: resnet18_cifar / wrn34_10), 'tiny' (= --tiny) or 'bench' (the CPU benchmarks' small pair, batch 128)")
    p.add_argument('--methods', default='rslad,adaad')
    p.add_argument('--sides', default=None, help="comma list of step sides: reference,fp32,bf16,bf16_attack,channels_last,compile (default: all; compile only on CUDA)")
    p.add_argument('--repeats', type=int, default=None, help='timed rounds per side after one warm-up')
    p.add_argument('--n-eval', type=int, default=None, help='images of the evaluation comparison')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads on the CPU (0: torch default)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--skip', default='', help="comma list of parts to leave out: step, check, eval")
    p.add_argument('--budget-min', type=float, default=7.5, help='start no new method or part after this many minutes (reported as skipped)')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------- the machine

def machine(dev)->dict:
    "Device, CPU model, native bf16 (CPU and GPU), torch, threads, load."
    from igdmfast.precision import cpu_model, native_bf16
    info = dict(device=str(dev), cpu=cpu_model(), cpu_native_bf16=native_bf16('cpu'), cores=os.cpu_count(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
                python=platform.python_version(), threads=torch.get_num_threads(), loadavg_start=list(os.getloadavg()))
    if dev.type == 'cuda':
        info.update(gpu=torch.cuda.get_device_name(dev), gpu_native_bf16=native_bf16(dev), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1))
    return info


def peak_mib(run, dev)->float:
    """Peak memory of one `run()`: CUDA's max allocated bytes over what was allocated before; on the CPU the process's
    peak RSS (`getrusage`), which only grows, so the CPU figure is the high-water mark so far, not the side's own."""
    if dev.type == 'cuda':
        sync(dev); torch.cuda.reset_peak_memory_stats(dev); before = torch.cuda.memory_allocated(dev)
        run(); sync(dev)
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------- the step

def build_models(cfg, seed):
    import timm, igdmfast.models  # noqa: F401 (registers the CIFAR models)
    torch.manual_seed(seed)
    teacher = timm.create_model(cfg['teacher'], num_classes=cfg['classes'], **cfg['t_kw']).eval()
    student = timm.create_model(cfg['student'], num_classes=cfg['classes'], **cfg['s_kw'])
    return teacher, student


def learner(teacher, student, x, y, method, cfg, dev, **opts):
    "`distill_learner` over the batches `x, y` in order: paper protocol, IGDM, no validation, no progress bar."
    from fastai.callback.core import Callback, CancelValidException
    from igdmfast.core import ThreatModel
    from igdmfast.data import tensor_dls
    from igdmfast.learner import distill_learner

    class NoValidation(Callback):
        def before_validate(self): raise CancelValidException()

    dls = tensor_dls(x, y, x[:1], y[:1], bs=cfg['bs'], device=dev, shuffle=False, class_names=[str(i) for i in range(cfg['classes'])])
    learn = distill_learner(teacher, student, dls, method=method, igdm=True, alpha=ALPHA[method], threat=ThreatModel(n_steps=cfg['pgd']),
                            protocol='paper', wd=reference.WEIGHT_DECAY[method], check_teacher=False, cbs=[NoValidation()], **opts)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == 'ProgressCallback'])
    return learn


def fit(learn):
    with learn.no_logging(): learn.fit(1)


def learner_options()->set:
    from igdmfast.learner import distill_learner
    return set(inspect.signature(distill_learner).parameters)


def step_sides(method, teacher, student, x, y, cfg, dev, names)->tuple[dict, dict]:
    """The callables timed side by side (each runs `cfg['batches']` steps, set up once) and what each one is.
    The bf16-attack side goes through the library's `attack_dtype` once `distill_learner` has it; until then it is the
    attack pass alone, timed against the fp32 attack pass on the same models (labelled so)."""
    from igdmfast.precision import to_channels_last
    opts = learner_options()
    sides, notes = {}, {}
    def lib(label, note, student_=None, teacher_=None, **o):
        if 'attack_dtype' in opts: o.setdefault('attack_dtype', None)   # explicit: 'auto' would turn bf16=True into a bf16 attack on CUDA
        learn = learner(copy.deepcopy(teacher) if teacher_ is None else teacher_, copy.deepcopy(student) if student_ is None else student_,
                        x, y, method, cfg, dev, **o)
        adv = getattr(learn, 'adv_examples', None)
        if hasattr(adv, 'check_precision'): adv.check_precision = False   # timed without the once-per-fit soundness check (see its own section)
        sides[label], notes[label] = (lambda: fit(learn)), note
    if 'reference' in names:
        s, t, opt = reference.make(copy.deepcopy(student), copy.deepcopy(teacher), method, dev)
        batches = [(x[i:i+cfg['bs']].to(dev), y[i:i+cfg['bs']].to(dev)) for i in range(0, len(x), cfg['bs'])]
        step = reference.STEPS[method]
        sides['reference'] = lambda: [step(s, t, opt, xb, yb, ALPHA[method], 1, 1, steps=cfg['pgd'], n_classes=cfg['classes']) for xb, yb in batches]
        notes['reference'] = 'bench/reference.py, float32'
    if 'fp32' in names: lib('fp32', 'distill_learner, float32 everywhere')
    if 'bf16' in names:
        lib('bf16 outer', 'distill_learner(bf16=True, attack_dtype=None): outer forwards/backward in bf16, attack and teacher in fp32', bf16=True)
    if 'bf16_attack' in names and 'attack_dtype' in opts:
        lib('bf16 attack', 'distill_learner(bf16=True, attack_dtype=bfloat16): the attack and the outer step in bf16 '
            '(timed without the soundness check that runs at the first batch of each fit)',
            bf16=True, attack_dtype=torch.bfloat16)
    if 'channels_last' in names:
        lib('channels-last', 'distill_learner, float32, student and teacher channels-last',
            student_=to_channels_last(copy.deepcopy(student)), teacher_=to_channels_last(copy.deepcopy(teacher)))
    if 'compile' in names and 'compile' in opts:
        # every `fit` builds and compiles the attack's view again (AdvExamples.before_fit), so this side is timed inside
        # one fit: per-batch times after the first `batches` (compilation), see `compiled_side`
        sides['compile'], notes['compile'] = compiled_side(teacher, student, method, cfg, dev), \
            'distill_learner(compile=True), float32; timed batch by batch inside one fit (compilation excluded)'
    return sides, notes


def compiled_side(teacher, student, method, cfg, dev):
    "A callable that fits `compile=True` once on (1 + repeats) x batches batches and returns the per-batch seconds."
    from fastai.callback.core import Callback
    nb = cfg['batches'] * (1 + cfg['repeats'])
    x, y = images(cfg['bs'] * nb, cfg['classes'], 0)

    class BatchTimer(Callback):
        order = -100
        def before_fit(self): self.times = []
        def before_batch(self):
            if self.training: sync(dev); self.t0 = time.perf_counter()
        def after_batch(self):
            if self.training: sync(dev); self.times.append(time.perf_counter() - self.t0)

    def run():
        learn = learner(copy.deepcopy(teacher), copy.deepcopy(student), x, y, method, cfg, dev, compile=True)
        timer = BatchTimer(); learn.add_cb(timer)
        fit(learn)
        return timer.times
    return run


def attack_pass_sides(method, teacher, student, x, y, cfg, dev)->dict:
    "The method's inner maximization alone on one batch, in fp32 and with `attack_models(..., bfloat16)`."
    from igdmfast.core import ThreatModel
    from igdmfast.methods import get_method
    from igdmfast.precision import attack_models
    from igdmfast.callback.adversarial import bn_folded
    m = get_method(method)
    # the views the library's attack runs (fold_bn=True, its default): conv→BN folded, eval mode
    s, t = bn_folded(copy.deepcopy(student).to(dev).eval()), bn_folded(copy.deepcopy(teacher).to(dev).eval())
    xb, yb = x[:cfg['bs']].to(dev), y[:cfg['bs']].to(dev)
    threat = ThreatModel(n_steps=cfg['pgd'])
    with torch.no_grad(): t_nat = t(xb)
    sl, tl = attack_models(s, t, torch.bfloat16)
    run = lambda a, b: (lambda: [m.attack(a, b, xb, yb, threat, t_nat) for _ in range(cfg['batches'])])
    return {'attack pass fp32': run(s, t), 'attack pass bf16': run(sl, tl)}


def step_part(args, cfg, dev, teacher, student)->dict:
    x, y = images(cfg['bs'] * cfg['batches'], cfg['classes'], args.seed)
    default = ['reference', 'fp32', 'bf16', 'bf16_attack', 'channels_last', 'compile']
    if dev.type == 'cpu': default.remove('compile')   # inductor's compile takes minutes on a CPU: ask for it with --sides
    names = args.sides.split(',') if args.sides else default
    out, n = {}, cfg['bs'] * cfg['batches']
    for method in args.methods.split(','):
        if _over_budget(args):
            out[method] = [dict(method=f"{method}+igdm", side='-', what=f'skipped: past --budget-min {args.budget_min}', error='budget')]
            continue
        sides, notes = step_sides(method, teacher, student, x, y, cfg, dev, names)
        failed, in_fit = {}, None
        for k in list(sides):   # one run each first (autotuning, caches); a side that fails is reported, not fatal
            try: r = sides[k]()
            except Exception as e: failed[k] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"; del sides[k]; continue
            if k == 'compile':   # timed inside its one fit: per-batch seconds after the compiling batches, as runs of `batches`
                b = cfg['batches']; t = r[b:]
                in_fit = [sum(t[i:i+b]) for i in range(0, len(t) - b + 1, b)] or [sum(r)]
                del sides[k]
        wall, cpu = interleaved(sides, cfg['repeats'], dev)
        if in_fit is not None: wall['compile'] = cpu['compile'] = in_fit   # cpu: not measured in-fit (wall only)
        ref = med(wall['reference']) if 'reference' in wall else None
        ref_c = med(cpu['reference']) if 'reference' in cpu else None
        rows = []
        for k in wall:
            row = dict(method=f"{method}+igdm", side=k, **{'img/s': n / med(wall[k]), 'vs reference': (ref / med(wall[k])) if ref else None})
            if dev.type == 'cpu' and k != 'compile':
                row.update({'img/cpu-s': n / med(cpu[k]), 'vs reference (cpu-s)': (ref_c / med(cpu[k])) if ref_c else None})
            row.update({'peak MiB': peak_mib(sides[k], dev) if k in sides else None, 'what': notes[k], 'wall_s': wall[k], 'cpu_s': cpu[k]})
            rows.append(row)
        rows += [dict(method=f"{method}+igdm", side=k, what=f"{notes[k]} -- FAILED: {err}", error=err) for k, err in failed.items()]
        if 'bf16_attack' in names and 'attack_dtype' not in learner_options():   # not plumbed yet: the attack pass alone
            att = attack_pass_sides(method, teacher, student, x, y, cfg, dev)
            aw, ac = interleaved(att, cfg['repeats'], dev)
            def estimate(times, step):   # the fp32 step with its attack pass replaced by the bf16 one
                f32, b16 = med(times['attack pass fp32']), med(times['attack pass bf16'])
                return (med(step['fp32']) - f32 + b16) if 'fp32' in step else None, f32, b16
            est, f32, b16 = estimate(aw, wall)
            row = dict(method=f"{method}+igdm", side='bf16 attack (estimate)',
                       **{'img/s': n / est if est else None, 'vs reference': (ref / est) if (ref and est) else None})
            if dev.type == 'cpu':
                est_c, f32, b16 = estimate(ac, cpu)   # the note quotes CPU-seconds on the CPU
                row.update({'img/cpu-s': n / est_c if est_c else None, 'vs reference (cpu-s)': (ref_c / est_c) if (ref_c and est_c) else None})
            unit = 'CPU-s' if dev.type == 'cpu' else 's'
            row.update({'peak MiB': None,
                        'what': (f"NOT through the library (distill_learner has no attack_dtype yet): the fp32 step with its "
                                 f"attack pass replaced by the bf16 one, the method's attack timed alone on the conv-BN-folded "
                                 f"views wrapped by attack_models(...): attack pass fp32 {f32:.3f} {unit}, bf16 {b16:.3f} {unit} "
                                 f"({f32 / b16:.2f}x)"),
                        'attack_fp32_s': aw['attack pass fp32'], 'attack_bf16_s': aw['attack pass bf16'],
                        'attack_fp32_cpu_s': ac['attack pass fp32'], 'attack_bf16_cpu_s': ac['attack pass bf16']})
            rows.append(row)
        out[method] = rows
    return out


# ----------------------------------------------------------------------------------------------------- soundness

def check_part(args, cfg, dev, teacher, student, model)->list:
    "The attack-precision check on CIFAR-shaped data: each method's own attack, and PGD-CE on the clean-trained model."
    from igdmfast.core import ThreatModel
    from igdmfast.precision import check_method_precision, check_attack_precision
    x, y = images(cfg['bs'], cfg['classes'], args.seed + 3)
    x, y = x.to(dev), y.to(dev)
    s, t = copy.deepcopy(student).to(dev), copy.deepcopy(teacher).to(dev).eval()
    threat = ThreatModel(n_steps=cfg['pgd'])
    dtypes = [torch.bfloat16] + ([torch.float16] if dev.type == 'cuda' else [])
    rows = []
    for dt in dtypes:
        for method in args.methods.split(','):
            r = check_method_precision(method, s, t, x, y, threat, dt, seed=args.seed)
            rows.append(dict(what=f"{method} inner maximization (untrained models)", **_check_row(r)))
        r = check_attack_precision(model, x, y, threat, 'ce', dt, seed=args.seed)
        rows.append(dict(what=f"PGD-{cfg['pgd']} CE on the clean-trained student", **_check_row(r)))
    return rows


def _check_row(r)->dict:
    return dict(dtype=str(r.dtype).replace('torch.', ''), objective_fp32=r.objective_fp32, objective_lowp=r.objective_lowp,
                shortfall_pct=100 * r.objective_shortfall, success_fp32=r.success_fp32, success_lowp=r.success_lowp,
                same_entries=r.same_entries, ok=r.ok, text=str(r))


# ----------------------------------------------------------------------------------------------------- evaluation

def trained(student, cfg, dev, seed)->torch.nn.Module:
    "The student after a short clean training on CIFAR-shaped synthetic images, so that the attacks have work to do."
    s = copy.deepcopy(student).to(dev)
    x, y = images(cfg['n_train'], cfg['classes'], seed + 1)
    opt = torch.optim.SGD(s.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    s.train()
    for _ in range(cfg['train_epochs']):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(s(x[idx].to(dev)), y[idx].to(dev))
            opt.zero_grad(); loss.backward(); opt.step()
    return s.eval().requires_grad_(False)


def eval_part(args, cfg, dev, model)->list:
    "robust_eval PGD-20 against a direct PGD-20 loop, the AutoAttack adapter against a direct pyautoattack call (all fp32)."
    from bench_eval import direct_pgd20
    from igdmfast.evaluate import robust_eval
    from igdmfast.attacks import autoattack
    from pyautoattack import AutoAttack
    n = args.n_eval or cfg['n_eval']
    x, y = images(n, cfg['classes'], args.seed + 2)
    xd, yd = x.to(dev), y.to(dev)
    bs, ver, atts = cfg['eval_bs'], cfg['aa_version'], cfg['aa_attacks']
    res = {}
    def lib_pgd(): res['lib_pgd'] = robust_eval(model, (x, y), attacks=['pgd20'], bs=bs, progress=False, warn=False).accuracy['pgd20']
    def ref_pgd(): res['ref_pgd'] = direct_pgd20(model, x, y, bs, dev)
    def lib_aa():
        _, robust = autoattack(model, xd, yd, 8/255, version=ver, attacks=atts, bs=bs, seed=0)
        res['lib_aa'] = 100 * robust.float().mean().item()
    def ref_aa():
        aa = AutoAttack(model, attacks=list(atts) if atts else None, device=dev, eps=8/255, norm='Linf', seed=0, version=ver)
        _, y_adv = aa.run_standard_evaluation(xd, yd, batch_size=bs)
        res['ref_aa'] = 100 * (y_adv == yd).float().mean().item()
    with torch.no_grad(): clean = 100 * (model(xd).argmax(1) == yd).float().mean().item()
    rows = []
    aa_name = f"AutoAttack {ver}" + (f" ({'+'.join(atts)})" if atts else '')
    for name, key, sides in (('PGD-20', 'pgd', dict(igdmfast=lib_pgd, direct=ref_pgd)), (aa_name, 'aa', dict(igdmfast=lib_aa, direct=ref_aa))):
        wall, _ = interleaved(sides, 1, dev)
        rows.append({'attack': name, 'precision': 'float32', 'n': n, 'clean %': clean,
                     'igdmfast img/s': n / med(wall['igdmfast']), 'direct img/s': n / med(wall['direct']),
                     'ratio': med(wall['direct']) / med(wall['igdmfast']), 'igdmfast acc %': res[f'lib_{key}'],
                     'direct acc %': res[f'ref_{key}'], 'peak MiB': peak_mib(sides['igdmfast'], dev)})
    return rows


# ----------------------------------------------------------------------------------------------------- report

def markdown(rep:dict)->str:
    m, c = rep['machine'], rep['config']
    lines = ["# gpu_check", "",
             f"- device: **{m.get('gpu', 'cpu')}**" + (f" (CUDA {m['cuda']}, {m['gpu_memory_gib']} GiB, native bf16: {m['gpu_native_bf16']})" if 'gpu' in m else ''),
             f"- CPU: {m['cpu']} ({m['cores']} cores, {m['cpu_capability']}), native bf16: {m['cpu_native_bf16']}",
             f"- torch {m['torch']}, Python {m['python']}, {m['threads']} CPU threads, load {[round(v, 2) for v in m['loadavg_start']]}",
             f"- size: {'tiny (a check that the script runs, not a measurement)' if c['tiny'] else c['size']}: student "
             f"`{c['student']}`, teacher `{c['teacher']}`, batch {c['bs']}, {c['classes']} classes, PGD-{c['pgd']}, "
             f"{c['batches']} steps per timed run, median of {c['repeats']} interleaved runs after 1 warm-up",
             f"- total wall time: {rep['total_s']:.1f} s", ""]
    for part, tb in rep.get('errors', {}).items(): lines += [f"## {part}: FAILED", "", '```', tb, '```', ""]
    if rep.get('skipped'): lines += [f"Skipped (past the time budget): {', '.join(rep['skipped'])}", ""]
    if 'step' in rep:
        lines += ["## Training step against bench/reference.py", "",
                  "`vs reference`: the reference's seconds per step over the side's (above 1: faster)"
                  + ("" if 'gpu' in m else "; on a shared CPU the CPU-seconds of the process (`cpu-s`, one thread) are the "
                     "steadier measure, wall-clock includes waiting for a core") + ". Peak memory: "
                  + ("`torch.cuda.max_memory_allocated` during one run." if 'gpu' in m else
                     "the process's peak RSS so far (it only grows: a high-water mark, not per side)."), ""]
        rows = [r for rows in rep['step'].values() for r in rows]
        cpu_cols = ['img/cpu-s', 'vs reference (cpu-s)'] if 'gpu' not in m else []
        lines += ['```', table(rows, ['method', 'side', 'img/s', 'vs reference'] + cpu_cols + ['peak MiB']), '```', ""]
        seen = {}
        for r in rows: seen.setdefault(r['what'], []).append(f"{r['method']} {r['side']}" if 'estimate' in r['side'] else r['side'])
        lines += [f"- {', '.join(dict.fromkeys(v))}: {k}" for k, v in seen.items()] + [""]
    if 'check' in rep:
        lines += ["## Attack-precision soundness check", "",
                  "The reduced-precision attack and the fp32 attack from the same start; both x′ scored in fp32 "
                  "(`igdmfast.precision.check_attack_precision` / `check_method_precision`, default tolerance: 5% of the "
                  "objective, 3 points of success rate).", ""]
        lines += ['```', table(rep['check'], ['what', 'dtype', 'objective_fp32', 'objective_lowp', 'shortfall_pct',
                                              'success_fp32', 'success_lowp', 'same_entries', 'ok']), '```', ""]
    if 'eval' in rep:
        lines += ["## Evaluation against direct calls", "", "Every number here is from float32 attacks.", "",
                  '```', table(rep['eval'], ['attack', 'precision', 'n', 'clean %', 'igdmfast img/s', 'direct img/s', 'ratio',
                                             'igdmfast acc %', 'direct acc %', 'peak MiB']), '```', ""]
    return '\n'.join(lines)


def _over_budget(args)->bool: return time.perf_counter() - args.t0 > 60 * args.budget_min


def main(argv=None)->dict:
    args = parse(argv)
    t0 = args.t0 = time.perf_counter()
    dev = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if dev.type == 'cuda' and not torch.cuda.is_available(): raise SystemExit("--device cuda: no CUDA device is available.")
    if dev.type == 'cpu' and args.threads: torch.set_num_threads(args.threads)
    if dev.type == 'cuda': torch.backends.cudnn.benchmark = True
    size = args.size or ('tiny' if args.tiny else 'full')
    args.tiny = size == 'tiny'
    cfg = dict(SIZES[size], size=size)
    if args.repeats: cfg['repeats'] = args.repeats
    skip = set(filter(None, args.skip.split(',')))
    rep = dict(machine=machine(dev), config=dict(cfg, tiny=args.tiny, methods=args.methods, seed=args.seed,
                                                 learner_options=sorted(learner_options() & {'bf16', 'compile', 'attack_dtype'})))
    print(f"gpu_check on {rep['machine'].get('gpu', 'cpu')} | CPU {rep['machine']['cpu']} (native bf16: "
          f"{rep['machine']['cpu_native_bf16']}) | {size} size", flush=True)
    teacher, student = build_models(cfg, args.seed)
    model = trained(student, cfg, dev, args.seed) if not {'check', 'eval'} <= skip else None
    for part, fn in (('check', lambda: check_part(args, cfg, dev, teacher, student, model)),
                     ('step', lambda: step_part(args, cfg, dev, teacher, student)),
                     ('eval', lambda: eval_part(args, cfg, dev, model))):
        if part in skip: continue
        if _over_budget(args):
            rep.setdefault('skipped', []).append(part); print(f"  {part}: skipped (past --budget-min {args.budget_min})"); continue
        t = time.perf_counter()
        try: rep[part] = fn()
        except Exception:   # the report is still written, with what failed
            import traceback
            rep.setdefault('errors', {})[part] = traceback.format_exc()[-3000:]
            print(f"  {part} FAILED:\n{rep['errors'][part]}", flush=True)
        rep.setdefault('part_s', {})[part] = time.perf_counter() - t
        print(f"  {part}: {rep['part_s'][part]:.1f} s", flush=True)
    rep['machine']['loadavg_end'] = list(os.getloadavg())
    rep['total_s'] = time.perf_counter() - t0
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    (out / 'gpu_check.json').write_text(json.dumps(rep, indent=1, default=str))
    (out / 'gpu_check.md').write_text(markdown(rep))
    print(markdown(rep))
    return rep


if __name__ == '__main__': main()
