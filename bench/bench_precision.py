"""The attack pass (one forward and one input gradient, the unit of every PGD step) in float32, under bfloat16 autocast
(`igdmfast.precision.AutocastModel`), channels-last (`to_channels_last`), both, and 'auto' (`AutoSpeed`'s rule on this
pass: the variant it times fastest at its first call, the probe in the warm-up round), for `resnet18_cifar` and
`tiny_mobilenet_cifar`, timed side by side (interleaved, median) in one run; prints the ratios, the CPU and its load.

    python bench/bench_precision.py [--device cuda] [--bs 64] [--repeats 5] [--threads 1] [--fp16] [--auto] [--json PATH]
"""
from __future__ import annotations
import copy, os, time
import torch
import torch.nn.functional as F
from _common import base_parser, setup, interleaved, med, table, dump, sync  # noqa: F401

MODELS = ('resnet18_cifar', 'tiny_mobilenet_cifar')


def attack_pass(model, x, y):
    "One PGD step's work: the forward at x′ and the input gradient of the summed cross-entropy (parameters frozen)."
    xr = x.detach().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction='sum'), xr)
    return g


def variants(model, fp16:bool)->dict:
    "The model as each side runs it: float32, bf16 autocast, channels-last, bf16 + channels-last (and fp16 on request)."
    from igdmfast.precision import AutocastModel, to_channels_last
    cl = to_channels_last(copy.deepcopy(model))
    out = {'fp32': model, 'bf16': AutocastModel(model, torch.bfloat16), 'channels-last': cl,
           'bf16 + channels-last': AutocastModel(cl, torch.bfloat16)}
    if fp16: out['fp16'] = AutocastModel(model, torch.float16)
    return out


def auto_side(vs:dict, x, y, dev):
    """The 'auto' side: at its first call (the warm-up round) AutoSpeed's rule on this pass alone: each fp32/bf16 x
    NCHW/NHWC variant (bf16 only where native) warmed up and timed once, `choose_speed` picks; later calls run the pick."""
    from igdmfast.callback.speed import choose_speed
    from igdmfast.precision import native_bf16
    names = {(False, None): 'fp32', (True, None): 'channels-last', (False, torch.bfloat16): 'bf16', (True, torch.bfloat16): 'bf16 + channels-last'}
    cands = {c: n for c, n in names.items() if c[1] is None or native_bf16(dev)}
    state = {}
    def run():
        if 'pick' not in state:
            times = {}
            for c, n in cands.items():
                attack_pass(vs[n], x, y)
                sync(dev); t = time.perf_counter(); attack_pass(vs[n], x, y); sync(dev); times[c] = time.perf_counter() - t
            state['pick'] = cands[choose_speed(times)]
            print(f"  auto: {state['pick']} (probe times {dict((cands[c], round(v, 4)) for c, v in times.items())})", flush=True)
        return attack_pass(vs[state['pick']], x, y)
    return run


def main(argv=None):
    p = base_parser(__doc__, bs=64, classes=10, repeats=5)
    p.add_argument('--models', default=','.join(MODELS))
    p.add_argument('--fp16', action='store_true', help='also time float16 autocast (with its loss scale)')
    p.add_argument('--auto', action='store_true', help="also time the 'auto' side (AutoSpeed's rule on this pass)")
    args = p.parse_args(argv)
    dev = setup(args)
    import timm, igdmfast.models  # noqa: F401
    from igdmfast.precision import cpu_model, native_bf16, cpu_flags
    flags = sorted(f for f in cpu_flags() if 'bf16' in f or f.startswith('amx') or f in ('avx2', 'avx512f'))
    load0 = [round(v, 2) for v in os.getloadavg()]
    head = (f"bench_precision: attack pass (forward + input gradient), batch {args.bs}, {args.classes} classes, median of "
            f"{args.repeats} interleaved runs after 1 warm-up\n  {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'} | "
            f"{cpu_model()} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}; flags {' '.join(flags) or '-'}) | "
            f"native bf16: {native_bf16(dev)} | torch {torch.__version__}, {torch.get_num_threads()} threads | load {load0}")
    print(head, flush=True)
    torch.manual_seed(args.seed)
    x = torch.rand(args.bs, 3, 32, 32, device=dev)
    y = torch.randint(0, args.classes, (args.bs,), device=dev)
    rows = []
    for name in args.models.split(','):
        model = timm.create_model(name, num_classes=args.classes).to(dev).eval().requires_grad_(False)
        vs = variants(model, args.fp16)
        sides = {k: (lambda m=m: attack_pass(m, x, y)) for k, m in vs.items()}
        if args.auto: sides['auto'] = auto_side(vs, x, y, dev)
        wall, cpu = interleaved(sides, args.repeats, dev)
        for k in sides:
            row = {'model': name, 'side': k, 'ms': 1000 * med(wall[k]), 'speed-up': med(wall['fp32']) / med(wall[k])}
            if dev.type == 'cpu': row.update({'cpu ms': 1000 * med(cpu[k]), 'speed-up (cpu-s)': med(cpu['fp32']) / med(cpu[k])})
            row.update(load=round(os.getloadavg()[0], 2), wall_s=[round(v, 4) for v in wall[k]], cpu_s=[round(v, 4) for v in cpu[k]])
            rows.append(row)
    cols = ['model', 'side', 'ms', 'speed-up'] + (['cpu ms', 'speed-up (cpu-s)'] if dev.type == 'cpu' else []) + ['load']
    print(table(rows, cols))
    dump(args, dict(header=head, cpu=cpu_model(), native_bf16=native_bf16(dev), flags=flags, loadavg_start=load0,
                    loadavg_end=[round(v, 2) for v in os.getloadavg()], args=vars(args), rows=rows))
    return rows


if __name__ == '__main__': main()
