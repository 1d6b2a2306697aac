"""Shared pieces of the benchmarks: the models, the data, the machine line, interleaved timing and peak memory."""
from __future__ import annotations
import argparse, json, os, platform, resource, statistics, subprocess, sys, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))   # run from a checkout without installing


def base_parser(doc:str, **defaults)->argparse.ArgumentParser:
    "The options every benchmark takes."
    p = argparse.ArgumentParser(description=doc)
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--bs', type=int, default=defaults.get('bs', 128), help='batch size')
    p.add_argument('--classes', type=int, default=defaults.get('classes', 100), help='number of classes (100: the CIFAR-100 scripts)')
    p.add_argument('--repeats', type=int, default=defaults.get('repeats', 5), help='timed rounds per side (one warm-up round more)')
    p.add_argument('--threads', type=int, default=1, help="torch CPU threads (0: torch's default); 1 because these 2 cores are shared")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    return p


def setup(args)->torch.device:
    "Apply `--threads`, check the device, return it."
    if args.threads and args.device == 'cpu': torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == 'cuda' and not torch.cuda.is_available(): raise SystemExit("--device cuda: no CUDA device is available.")
    return dev


PAIRS = {'bench': ('tiny_resnet_cifar', 'tiny_mobilenet_cifar', 3, 32),    # (teacher, student, channels, size)
         'resnet18': ('tiny_resnet_cifar', 'resnet18_cifar', 3, 32),
         'digits': ('small_cnn', 'tiny_mobilenet_cifar', 1, 8)}           # the main job's pair, on 8x8 digits' shape


def models(classes:int, seed:int=0, pair:str='bench'):
    "The benchmark pair (`PAIRS`; default: a narrow CIFAR ResNet teacher and a small MobileNet-style student, 32x32 inputs)."
    import timm, igdmfast.models  # noqa: F401
    t, s, c, _ = PAIRS[pair]
    torch.manual_seed(seed)
    teacher = timm.create_model(t, num_classes=classes, in_chans=c).eval()
    student = timm.create_model(s, num_classes=classes, in_chans=c)
    return teacher, student


def images(n:int, classes:int, seed:int=0, pair:str='bench'):
    "Images of the pair's shape (CIFAR's by default) in [0,1] with class structure (igdmfast's `synth_dls` recipe) and their labels, on the CPU."
    from igdmfast.data import synth_dls
    _, _, c, size = PAIRS[pair]
    dls = synth_dls(n_train=n, n_valid=1, n_classes=classes, size=size, in_chans=c, bs=n, seed=seed, device='cpu')
    ds = dls.train.dataset
    return ds.x.float().div(255) if ds.x.dtype == torch.uint8 else ds.x.clone(), ds.y.clone()


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def machine(dev)->dict:
    "What the figures were measured on."
    info = dict(python=platform.python_version(), torch=torch.__version__, cpu=_cpu_name(), cores=os.cpu_count(),
                threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                loadavg_start=[round(v, 2) for v in os.getloadavg()])
    if dev.type == 'cuda': info['gpu'] = torch.cuda.get_device_name(dev)
    return info


def describe(info:dict)->str:
    "One line on the machine: device, CPU, cores, torch, threads, load."
    dev = info.get('gpu') or 'cpu'
    return (f"{dev} | {info['cpu']} ({info['cores']} cores, {info['cpu_capability']}) | torch {info['torch']}, "
            f"{info['threads']} threads | load {info['loadavg_start']}")


def _cpu_name():
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or 'unknown'


def interleaved(sides:dict, repeats:int, dev)->tuple[dict, dict]:
    """Time each side's callable `repeats` times after one warm-up round, alternating the order every round (ABBA...)
    so that a change in the machine's load hits every side alike. Returns the wall-clock and the process CPU seconds,
    {name: [seconds, ...]} each (CPU time counts only this process's own work: on a shared CPU with one torch thread it
    is the steadier measure; with several threads it also counts OpenMP spinning)."""
    names, wall, cpu = list(sides), {k: [] for k in sides}, {k: [] for k in sides}
    for r in range(repeats + 1):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            sync(dev); t0, c0 = time.perf_counter(), time.process_time()
            sides[k]()
            sync(dev); dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r: wall[k].append(dt); cpu[k].append(dc)
    return wall, cpu


def med(ts): return statistics.median(ts)


def rss_kb()->int:
    "Current resident set size of this process, in KiB."
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'): return int(line.split()[1])
    return 0


def peak_memory(run, dev)->float:
    """Peak memory (MiB) that `run()` adds on top of what the process holds before it: CUDA's max allocated bytes,
    or on the CPU the growth of the peak resident set (`getrusage` maxrss) over the RSS before the run."""
    if dev.type == 'cuda':
        sync(dev); torch.cuda.reset_peak_memory_stats(dev); before = torch.cuda.memory_allocated(dev)
        run(); sync(dev)
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    before = rss_kb()
    run()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def child_memory(script:str, argv:list, side:str, extra:list=())->float:
    """Run `script` again in a fresh process that measures only `side` (so the peaks of the sides never mix). glibc is
    told to serve every allocation over 64 KiB by `mmap` and give it back on `free`, so that the resident set follows
    the live tensors instead of what the allocator keeps cached (without it both sides read about the same 2.3 GiB)."""
    cmd = [sys.executable, script, *argv, '--mem-child', side, *extra]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='65536')
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0: raise RuntimeError(f"memory child {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])['peak_mib']


def table(rows:list, cols:list)->str:
    "A plain aligned text table."
    cells = [[str(c) for c in cols]] + [[_fmt(r.get(c, '')) for c in cols] for r in rows]
    w = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    line = lambda row: '  '.join(v.rjust(w[i]) if i else v.ljust(w[i]) for i, v in enumerate(row))
    return '\n'.join([line(cells[0]), '  '.join('-' * x for x in w)] + [line(r) for r in cells[1:]])


def _fmt(v):
    if isinstance(v, float): return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _drop_json(argv):
    out, skip = [], False
    for a in argv:
        if skip: skip = False; continue
        if a == '--json': skip = True; continue
        out.append(a)
    return out


def dump(args, result:dict):
    "Print the results as JSON on request."
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
