"Shared test settings: under pytest-xdist each worker (and every process it starts) uses one CPU thread."
import os

if os.environ.get('PYTEST_XDIST_WORKER'):
    # two workers with two OpenMP threads each would oversubscribe a 2-core machine and spin
    os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = '1'
    import torch
    torch.set_num_threads(1)
